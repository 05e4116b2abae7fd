#!/usr/bin/env bash
# One-GPU device check: `benchmarks/device_check.sh OUTDIR` from a fresh clone after only ./setup.sh.
# Runs `pytest -m gpu` (CUDA vs CPU equivalence: region extraction, SCAN/PFAN scoring, one training step of
# each model) and the throughput measurements (extraction at 600×1000, SCAN/PFAN scoring pairs/s and the
# projected COCO 5K matrix time, training it/s at batch 128, peak GPU memory), then writes
# OUTDIR/device_check.json and OUTDIR/device_check.md (plus the tests' log and JUnit XML).
# ≤ 8 minutes on one H100/H200-class GPU: new stages stop starting after ITMATCH_DEVICE_CHECK_BUDGET seconds
# (default 420) and the whole run is cut at 480 s. Without CUDA the GPU parts are skipped with a clear
# message and the script exits 0. Exit 1: a GPU test failed or a stage raised (see the Markdown file).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: benchmarks/device_check.sh OUTDIR}
if [ ! -x .venv/bin/python ]; then
  echo "device_check: .venv is missing; run ./setup.sh first" >&2
  exit 2
fi
mkdir -p "$out"
.venv/bin/python -c "import torch; print('torch', torch.__version__, 'CUDA build', torch.version.cuda, \
'| CUDA available:', torch.cuda.is_available())"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
exec timeout --kill-after=10 480 .venv/bin/python benchmarks/device_check.py "$out" \
  --budget-s "${ITMATCH_DEVICE_CHECK_BUDGET:-420}"
