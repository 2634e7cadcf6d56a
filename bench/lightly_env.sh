#!/usr/bin/env bash
# lightly and the packages it imports, into runs/bench/lightly-site (PYTHONPATH for the benchmark
# only): clipx's environment stays as pyproject.toml makes it, and torch is the one already in .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python -m pip install --quiet --no-deps --target runs/bench/lightly-site \
    'lightly==1.6.0' 'hydra-core==1.3.8' 'omegaconf==2.4.0' 'antlr4-python3-runtime==4.9.3' \
    'pytorch_lightning==2.6.6' 'lightning-utilities==0.15.3' 'torchmetrics==1.9.0'
echo "lightly installed in runs/bench/lightly-site"
