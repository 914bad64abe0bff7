#!/usr/bin/env bash
# The GPU acceptance run, one command, under 9 minutes on one CUDA GPU with no network:
#
#   bash benchmarks/gpu_check.sh [OUTDIR]            # default OUTDIR: benchmarks/results/gpu-check-<UTC time>
#   GPU_CHECK_DRY=1 bash benchmarks/gpu_check.sh OUT  # the same steps on the CPU, tiny sizes (CI runs this)
#
# Needs a python3 (GPU_CHECK_PYTHON overrides) that already has torch, torchvision, accelerate,
# safetensors, PyYAML, tensorboard and pytest; it installs distrain itself with
# `pip install --no-deps --no-build-isolation -e .` and DeepSpeed (+ transformers) from the wheelhouse
# in .gpu-wheels/ (GPU_CHECK_WHEELS overrides) when there is one: benchmarks/gpu_wheelhouse.sh builds it
# on a machine with PyPI access. Records OUTDIR/gpu_check.json, OUTDIR/logs/, prints the table last.
# GPU_CHECK_BUDGET_S caps the whole run (default 530 s; 900 s dry). What each step does and
# how "agree" and the targets are defined: benchmarks/gpu_check.py, benchmarks/README.md.
set -u
cd "$(dirname "$0")/.."
PY="${GPU_CHECK_PYTHON:-python3}"
export GPU_CHECK_PYTHON="$PY"
exec "$PY" benchmarks/gpu_check.py "$@"
