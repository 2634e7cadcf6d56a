#!/usr/bin/env bash
# The benchmark's peers, into runs/bench/openclip-site (PYTHONPATH for their runs only): open_clip_train's
# one extra need, webdataset < 1.0 (its pin), and CLIP_benchmark without its dependencies (what
# zero-shot classification and retrieval import is in .venv already, except requests). clipx keeps webdataset 1.x,
# and all use the same torch and open_clip from .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python -m pip install --quiet --no-deps --upgrade --target runs/bench/openclip-site 'webdataset==0.2.86' 'clip-benchmark==1.6.2' \
    requests urllib3 certifi charset-normalizer
echo "webdataset 0.2.86 (open_clip's pin) and clip-benchmark 1.6.2 installed in runs/bench/openclip-site"
