#!/usr/bin/env bash
# The one prepared command for a GPU machine: install the carried wheels, build the extension, run the GPU tests
# and every benchmark, write benchmarks/results/<device>-<date>.{json,md} (copied to $OUT when set) and print the
# table last. Budget: well under 8 minutes on an H100. Usage (repo root): bash benchmarks/gpu_check.sh
# Environment: GPU_CHECK_TESTS=0 skips the tests; GPU_CHECK_K="expr" selects benchmarks (pytest -k).
set -uo pipefail
cd "$(dirname "$0")/.."
t0=$(date +%s)
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "gpu_check: no NVIDIA GPU visible (nvidia-smi -L failed). Run this on the GPU machine; on CPU use" \
       "'pytest benchmarks/ --benchmark-only'." >&2
  exit 2
fi
python - <<'PY' || { echo "gpu_check: torch sees no CUDA device" >&2; exit 2; }
import torch, sys
sys.exit(0 if torch.cuda.is_available() else 1)
PY
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
unset TRITON_INTERPRET OVR_BACKEND
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  echo "== installing carried wheels"; python -m pip install -q --no-index --no-deps .whl/*.whl || exit 3
fi
echo "== building ovr_kernels._C"
python -m pip install -q --no-index --no-deps --no-build-isolation -e . || exit 3
python -c "import ovr_kernels as o; print('HAS_EXT', o.HAS_EXT, 'HAS_CUDA_EXT', o.HAS_CUDA_EXT)"
device=$(python -c "import torch,re; print(re.sub(r'[^A-Za-z0-9]+','-',torch.cuda.get_device_name()).strip('-'))")
stamp=$(date -u +%Y-%m-%d)
base="benchmarks/results/${device}-${stamp}"
mkdir -p benchmarks/results
if [ "${GPU_CHECK_TESTS:-1}" = "1" ]; then
  echo "== GPU tests"
  timeout 180 python -m pytest tests -m gpu -q -x -p no:cacheprovider 2>&1 | tee "${base}-tests.log" | tail -25
fi
echo "== benchmarks ($(( $(date +%s) - t0 )) s so far)"
timeout 360 python -m pytest benchmarks --benchmark-only -q -p no:cacheprovider ${GPU_CHECK_K:+-k "$GPU_CHECK_K"} \
  --benchmark-json="${base}.json" 2>&1 | tee "${base}-bench.log" | tail -15
python benchmarks/report.py "${base}.json" --md "${base}.md" || exit 4
if [ -n "${OUT:-}" ]; then cp "${base}".* "${base}"-*.log "$OUT"/ 2>/dev/null; fi
echo "== done in $(( $(date +%s) - t0 )) s; results: ${base}.json / .md"
cat "${base}.md"
