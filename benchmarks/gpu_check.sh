#!/usr/bin/env bash
# The GPU check, one call: the GPU story (benchmarks/gpu.py) and the property tests on CUDA.
# Run from the repository root on a machine with a CUDA device and no package index:
#   pip wheel --no-deps -w .whl optree einops   # here, first: optree (and the peers) as wheels
#   bash benchmarks/gpu_check.sh [OUT_DIR]       # there
set -uo pipefail
out=${1:-${OUT:-/tmp/gpu-check}}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv
python3 -c "import torch, optree; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
# the property tests on CUDA (pytest's warning filters off: another torch warns otherwise)
timeout 150 python3 -m pytest -q -p no:cacheprovider -p no:warnings tests/test_gradients.py \
  -k cuda 2>&1 | tail -15 | tee "$out/tests.log"
timeout "${GPU_SECONDS:-330}" python3 benchmarks/gpu.py --json "$out/gpu.json" 2>&1 \
  | grep -v "Warning\|warn(" | tee "$out/gpu.log"
