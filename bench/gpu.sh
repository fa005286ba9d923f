#!/usr/bin/env bash
# Issue 20 on a lent GPU (one command, under 8 minutes): nanoGPT's GPU recipe through the pipeline's loop
# (compile_mode reduce-overhead, 2000 of its 5000 steps) against nanoGPT's model by hand, in one process;
# table on stdout, JSON in $OUT (or bench/results/), rewritten after each phase. Needs torch with CUDA
# (`make install TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"`) and Tiny
# Shakespeare at the config's path (../shared/data/tinyshakespeare/input.txt) or --data PATH. Without CUDA it
# refuses to run unless --smoke (CPU, tiny sizes). Extra arguments go to bench/gpu_step.py.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
out="${OUT:-bench/results}"
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
# gpu_step.PLANNED_SECONDS (420) plus margin, inside one device command (600 s at most).
timeout 500 "$PYTHON" bench/gpu_step.py --out "$out/gpu_step.json" "$@"
