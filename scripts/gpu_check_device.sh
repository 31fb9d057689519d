#!/usr/bin/env bash
# The one prepared GPU check for a lent machine without Ray, vLLM or internet (see benchmarks/gpu_check.py).
# Installs the carried wheels (gpu_wheels/) into /tmp/site, then runs gpu_check.py twice: tiny sizes
# first (every code path on CUDA in ~1 min), then the realistic width. Each run has its own time limit
# so a slow part still leaves the others' output in $OUT.
#   device tool: carry ["gpu_wheels"], timeout_s 560, command: bash scripts/gpu_check_device.sh
set -u
OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"
exec > >(tee "$OUT/device.log") 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"

start=$(date +%s)
SAM2_BUILD_CUDA=0 DS_BUILD_OPS=0 python3 -m pip install -q --no-index --no-deps --no-build-isolation \
    --target /tmp/site gpu_wheels/* || echo "INSTALL FAILED"
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
# The carried transformers may want newer tokenizers/hub than the image has: fall back to the image's.
if ! python3 -c "import transformers.models.qwen2_5_vl" 2>"$OUT/tf_import.err"; then
    echo "carried transformers does not import ($(tail -1 "$OUT/tf_import.err")); using the image's"
    rm -rf /tmp/site/transformers /tmp/site/transformers-*
fi
python3 -c "import deepspeed, sam2, pycocotools, transformers; print('deepspeed', deepspeed.__version__, 'transformers', transformers.__version__)"
echo "install: $(( $(date +%s) - start )) s"

timeout 150 python3 benchmarks/gpu_check.py --tiny --device cuda --out "$OUT/gpu_check_tiny.json"
echo "tiny rc=$? at $(( $(date +%s) - start )) s"
timeout ${FULL_LIMIT:-330} python3 benchmarks/gpu_check.py --work-dir /tmp/gc --out "$OUT/gpu_check.json" "$@"
echo "full rc=$? at $(( $(date +%s) - start )) s"
nvidia-smi --query-gpu=memory.used --format=csv
