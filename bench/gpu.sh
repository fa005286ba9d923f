#!/usr/bin/env bash
# Issue 6, goal 5, on a lent GPU (under 5 minutes of device time): nanoGPT's GPU recipe through the
# pipeline's loop, a bare loop and nanoGPT's model by hand; table on stdout, JSON in $OUT (or bench/results/).
# Needs torch with CUDA and this project installed (pip install -e .) and Tiny Shakespeare at
# ../shared/data/tinyshakespeare/input.txt (train_step.py's stand-in corpus otherwise).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
out="${OUT:-bench/results}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
timeout 280 "$PYTHON" bench/gpu_step.py --out "$out/gpu_step.json" "$@"
