#!/usr/bin/env bash
# Build the wheelhouse gpu_check.sh installs DeepSpeed from, on a machine WITH PyPI access, for the
# GPU machine's Python (which has no network):
#
#   bash benchmarks/gpu_wheelhouse.sh [DIR] [PYTHON_VERSIONS]     # default .gpu-wheels, "3.10 3.11 3.12 3.13"
#
# DIR is git-ignored (about 25 MB for four Python versions): a session with a GPU builds it here and
# names it in the device run's `carry` (carry: [".gpu-wheels"]); gpu_check.sh then runs
# `pip install --no-index --find-links .gpu-wheels deepspeed transformers` on the GPU machine.
# DeepSpeed is built without its compiled ops (DS_BUILD_OPS=0: distrain uses none of them) against this
# venv's torch; the rest are the pure-Python and binary wheels DeepSpeed and transformers (which
# Accelerate's DeepSpeed path imports) need beyond torch, numpy and what accelerate already brings,
# at the versions of constraints.txt. torch itself is never downloaded.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR="${1:-.gpu-wheels}"
VERSIONS="${2:-3.10 3.11 3.12 3.13}"
PIP="${PIP:-.venv/bin/pip}"
[ -x "$PIP" ] || PIP="/work/main/.venv/bin/pip"
mkdir -p "$DIR"
DS_BUILD_OPS=0 "$PIP" wheel -q --no-deps --no-build-isolation -c constraints.txt deepspeed -w "$DIR"
PURE="hjson py-cpuinfo pydantic annotated-types typing-inspection typing-extensions einops ninja
      transformers huggingface-hub typer click shellingham rich annotated-doc markdown-it-py mdurl
      pygments httpx2 httpcore2 anyio h11 idna certifi filelock fsspec tqdm packaging"
BINARY="pydantic-core tokenizers regex msgpack hf-xet safetensors pyyaml psutil"
"$PIP" download -q --no-deps -c constraints.txt -d "$DIR" $PURE
for v in $VERSIONS; do
  "$PIP" download -q --no-deps --only-binary=:all: --python-version "$v" --implementation cp \
      --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
      -c constraints.txt -d "$DIR" $BINARY
done
du -sh "$DIR"
ls "$DIR" | wc -l
