#!/usr/bin/env bash
# Time `make demo` from a fresh clone (set-up included), as a new user would run it, and print a
# Markdown block for BENCHMARKS.md. Usage: bench/fresh_clone_demo.sh [REPO] [WORKDIR]
set -euo pipefail
repo=$(cd "${1:-$(dirname "$0")/..}" && pwd)
work=${2:-$(mktemp -d)}
git clone -q "$repo" "$work/clipx"
cd "$work/clipx"
start=$(date +%s)
make demo > "$work/make-demo.log" 2>&1
end=$(date +%s)
echo "### make demo from a fresh clone ($(date -u +%Y-%m-%d), $(nproc) cores, $(git rev-parse --short HEAD))"
echo
echo "- command: \`bench/fresh_clone_demo.sh\` (git clone, then \`make demo\`: venv, pip install, prep, train, eval)"
echo "- wall time including set-up: $((end - start)) s"
echo
.venv/bin/clipx table runs/demo/results.json
