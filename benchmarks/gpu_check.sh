#!/usr/bin/env bash
# The one prepared command for a GPU window: install the carried wheels, build the extension, warm the Triton cache,
# run the GPU correctness tests, then every benchmark file in its own pytest process with its own JSON and time
# budget (headline kernels first, heavy runs last or opt-in), and print one table: kernel, shape, ovr vs each
# baseline, and the verdict of every GPU test.
#
#   bash benchmarks/gpu_check.sh              # on the GPU machine (fails fast without one)
#   bash benchmarks/gpu_check.sh --rehearse   # this control flow on a CPU machine: tiny selections, interpreter
#
# Nothing is lost when a section is cut: each section writes its own files as it finishes, a section over its budget
# gets SIGINT first (pytest then still writes its JSON and junit files) and SIGKILL 15 s later, and on every exit a
# trap rebuilds the table from whatever exists and copies it to $OUT. $OUT takes few files, so it gets summary.md,
# results.tar.gz (every JSON, log and junit file) and the combined results JSON.
# Results: benchmarks/results/<device>-<date>-<sha>/ (plus <device>-<date>-<sha>.md, the table, naming device,
# torch / triton versions, date and git sha) and a copy of the README with its results section refreshed. Back on the
# development machine: tar -xzf results.tar.gz -C benchmarks/results, then commit that directory and
# `python benchmarks/report.py --dir benchmarks/results/<name> --md benchmarks/results/<name>.md --readme README.md`.
# Device tool: carry [".whl"], timeout_s >= GPU_CHECK_TOTAL + 60 (the trap's report and copy run after the last cut).
#
# Environment: GPU_CHECK_SHA (the commit, where the tree has no .git), GPU_CHECK_TOTAL (s, default 540: the whole
# run's budget), GPU_CHECK_BUDGET_<section> (s, one section's cap), GPU_CHECK_SECTIONS="tests bench_train_step"
# (run only these sections; wheels and build always run), GPU_CHECK_AUTOTUNE=1 (the block-config sweep, opt-in),
# GPU_CHECK_TRAIN_STEP=0 (skip the whole-step benchmarks, which otherwise run last if time is left),
# GPU_CHECK_HEAVY=1 (the compiled baseline of the linear log-prob benchmark), GPU_CHECK_K="expr" (pytest -k for
# every benchmark file), PYTHON (the interpreter).
#
# Sections as measured on an H200 (2026-12-04, cold caches): wheels 1 s, build 22 s, warm 49 s, attention 62 s,
# linear log-prob 103 s, PPO 23 s, GAE 15 s; the GPU tests (~210: every kernel test module with DEVICE = cuda, each
# new specialisation compiled on first use) took 178 s for the first 91, and a second call ran the other 114 with
# 58 of the first again in 64 s, so ~230 s in all. That leaves little of a 600 s call for the whole-step
# benchmarks: with 15 minutes of device time, a second call with GPU_CHECK_SECTIONS="bench_train_step" (about a
# minute to start) gets them.
set -uo pipefail
cd "$(dirname "$0")/.."
REHEARSE=0
[ "${1:-}" = "--rehearse" ] && REHEARSE=1
T0=$(date +%s)
TOTAL=${GPU_CHECK_TOTAL:-540}
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
PY=
for candidate in ${PYTHON:-} python3 python; do  # the interpreter that has torch (plain python3 on the GPU image)
  if "$candidate" -c "import torch" >/dev/null 2>&1; then PY=$candidate; break; fi
done
[ -n "$PY" ] || { echo "gpu_check: no python with torch found (set PYTHON=...)" >&2; exit 2; }

if [ "$REHEARSE" = 0 ]; then
  if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "gpu_check: no NVIDIA GPU visible (nvidia-smi -L failed). Run this on the GPU machine, or" \
         "'bash benchmarks/gpu_check.sh --rehearse' to rehearse its control flow on a CPU." >&2
    exit 2
  fi
  if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: nvidia-smi sees a GPU but torch.cuda.is_available() is False (a CPU torch?)" >&2
    exit 2
  fi
  unset TRITON_INTERPRET OVR_BACKEND
else
  export TRITON_INTERPRET=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  unset OVR_BACKEND
fi
export TRITON_CACHE_DIR="$PWD/.cache/triton"  # one cache for every process of the run: warmed once
mkdir -p "$TRITON_CACHE_DIR"

# the device machine's copy of the tree may have no .git: GPU_CHECK_SHA names the commit then
export OVR_GIT_SHA=${GPU_CHECK_SHA:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
SHA=${OVR_GIT_SHA:0:7}
DEVICE=$("$PY" -c "import re, torch
n = torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu-rehearsal'
print(re.sub(r'[^A-Za-z0-9]+', '-', n).strip('-'))")
NAME="${DEVICE}-$(date -u +%Y-%m-%d)-${SHA}"
RES=${GPU_CHECK_RESULTS:-benchmarks/results}/$NAME
rm -rf "$RES" && mkdir -p "$RES"
SECTIONS="$RES/sections.tsv"
FAILED=0
printf 'section\tstatus\tseconds\tbudget\n' > "$SECTIONS"

finish() {  # every exit: rebuild the table from what exists, copy it out
  local rc=$?
  trap - EXIT INT TERM
  local readme=()  # a refreshed copy of the README travels back; the checkout's own is never rewritten here
  cp README.md "$RES/README.md" 2>/dev/null && readme=(--readme "$RES/README.md")
  "$PY" benchmarks/report.py --dir "$RES" --md "$RES.md" --combined "$RES/combined.json" "${readme[@]}" \
    > "$RES/summary.md" 2> "$RES/report.err" || echo "gpu_check: report.py failed (see $RES/report.err)" >&2
  cp "$RES.md" "$RES/summary.md" 2>/dev/null
  tar -czf "$RES.tar.gz" -C "$(dirname "$RES")" "$NAME" 2>/dev/null
  if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    cp "$RES/summary.md" "$OUT/summary.md" 2>/dev/null
    cp "$RES.tar.gz" "$OUT/results.tar.gz" 2>/dev/null
    cp "$RES/combined.json" "$OUT/combined.json" 2>/dev/null
  fi
  echo "== gpu_check: exit $rc after $(( $(date +%s) - T0 )) s; results in $RES (${OUT:+copied to $OUT})"
  cat "$RES/summary.md" 2>/dev/null
  exit $rc
}
trap finish EXIT
trap 'exit 130' INT TERM

# run_section NAME BUDGET CMD...: the command under min(budget, time left), SIGINT at the limit, SIGKILL 15 s later
run_section() {
  local name=$1 budget=$2
  shift 2
  local override="GPU_CHECK_BUDGET_${name}"
  budget=${!override:-$budget}
  if [ -n "${GPU_CHECK_SECTIONS:-}" ] && [ "$name" != wheels ] && [ "$name" != build ] \
      && [[ " $GPU_CHECK_SECTIONS " != *" $name "* ]]; then
    echo "== $name: not selected (GPU_CHECK_SECTIONS=$GPU_CHECK_SECTIONS)"
    printf '%s\tnot selected\t0\t%s\n' "$name" "$budget" >> "$SECTIONS"
    return 0
  fi
  local left=$(( TOTAL - ($(date +%s) - T0) ))
  if [ "$left" -lt 15 ]; then
    echo "== $name: skipped, ${left} s of the ${TOTAL} s budget left"
    printf '%s\tskipped (no time)\t0\t%s\n' "$name" "$budget" >> "$SECTIONS"
    return 0
  fi
  [ "$budget" -gt "$left" ] && budget=$left
  echo "== $name (budget ${budget} s, $(( $(date +%s) - T0 )) s so far)"
  local s0=$(date +%s) rc status
  timeout -s INT -k 15 "$budget" "$@" > "$RES/$name.log" 2>&1
  rc=$?
  case $rc in
    0) status=ok ;; 124|137) status="timeout after ${budget} s" ;; 5) status="ok (nothing selected)"; rc=0 ;;
    *) status="exit $rc" ;;
  esac
  tail -n 4 "$RES/$name.log" | sed 's/^/   /'
  echo "   -> $name: $status in $(( $(date +%s) - s0 )) s"
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$(( $(date +%s) - s0 ))" "$budget" >> "$SECTIONS"
  [ "$rc" -ne 0 ] && FAILED=1
  return $rc
}

# -------- setup: wheels (only those the image lacks), the extension
if [ "$REHEARSE" = 0 ]; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    run_section wheels 60 "$PY" benchmarks/install_wheels.py .whl /tmp/ovr-site
    export PYTHONPATH="/tmp/ovr-site${PYTHONPATH:+:$PYTHONPATH}"
  fi
  run_section build 150 "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e . \
    || echo "   (build failed: the tests and benchmarks run without the compiled extension)"
fi
"$PY" -c "import ovr_kernels as o, torch, triton
print('torch', torch.__version__, 'triton', triton.__version__, 'HAS_EXT', o.HAS_EXT, 'HAS_CUDA_EXT', o.HAS_CUDA_EXT)" \
  | tee "$RES/env.txt"

# -------- warm the Triton cache: every kernel once at its benchmark specialisation
run_section warm 120 "$PY" benchmarks/warm_kernels.py $([ "$REHEARSE" = 1 ] && echo --tiny)

# -------- GPU correctness tests first (their verdicts go in the table)
if [ "$REHEARSE" = 1 ]; then  # the gpu tests skip here; one quick interpreter test file gives real verdicts
  TESTS=(tests/kernels/test_gpu_varlen_attention.py tests/kernels/test_gpu_linear_logprob.py
         tests/kernels/test_gpu_losses.py tests/kernels/test_advantages.py::test_grpo_eps
         tests/kernels/test_advantages.py::test_broadcast_to_tokens)
else
  # every CUDA-using kernel test, the vLLM engine's GPU test (it skips where vllm is not installed) and the
  # shared-prompt packing on the Triton kernels
  TESTS=(tests/kernels tests/train/test_vllm_engine.py tests/train/test_rl_share_prompts.py -m gpu)
fi
run_section tests 270 "$PY" -m pytest -q -p no:cacheprovider -rfEs --junitxml="$RES/tests.xml" "${TESTS[@]}"

# -------- benchmarks: headline kernels first, one process and JSON each
bench() {  # bench FILE BUDGET [extra pytest args]
  local file=$1 budget=$2
  shift 2
  local sel=("$@")
  [ -n "${GPU_CHECK_K:-}" ] && sel+=(-k "$GPU_CHECK_K")
  run_section "$file" "$budget" "$PY" -m pytest "benchmarks/$file.py" --benchmark-only -q -p no:cacheprovider \
    --benchmark-json="$RES/$file.json" "${sel[@]}"
}
if [ "$REHEARSE" = 1 ]; then  # the cheap CPU benchmark of each file (the GPU ones skip)
  bench bench_varlen_attention 60
  bench bench_linear_logprob 60 -k "not peak_memory"
  bench bench_ppo_loss 60 -k fused
  bench bench_gae 60
  bench bench_packing 60 -k ffd
else
  bench bench_varlen_attention 100
  export OVR_BENCH_HEAVY=${GPU_CHECK_HEAVY:-0}
  bench bench_linear_logprob 130
  bench bench_ppo_loss 45
  bench bench_gae 30
  # bench_packing is CPU work (host-side packing): `make bench` on any machine measures it, not the GPU window
fi

# -------- opt-in block-config sweep, then the whole-step benchmarks with what is left
if [ "$REHEARSE" = 1 ]; then  # a copy of the table: rehearsal timings mean nothing
  run_section autotune 60 "$PY" benchmarks/autotune.py --tiny --budget 15 --out "$RES/autotune.json" \
    --table "$RES/attention_configs.json"
elif [ "${GPU_CHECK_AUTOTUNE:-0}" = 1 ]; then  # winners go into the committed table (and come back in the tarball)
  run_section autotune 90 "$PY" benchmarks/autotune.py --budget 80 --out "$RES/autotune.json" \
    --table ovr_kernels/attention_configs.json
  cp ovr_kernels/attention_configs.json "$RES/attention_configs.json"
fi
if [ "${GPU_CHECK_TRAIN_STEP:-1}" = 1 ]; then
  if [ "$REHEARSE" = 1 ]; then
    bench bench_train_step 60 -k rl_update_tiny
  else
    bench bench_train_step 240
  fi
fi
exit $FAILED  # 1 when a section failed or ran out of time (the table says which)
