#!/usr/bin/env bash
# One command for a machine with an NVIDIA GPU: build the CUDA extension, run the
# CUDA tests, run the GPU benchmarks, then run the CUDA tests again under
# compute-sanitizer: memcheck (0 errors expected), and racecheck over the kernels that
# share memory between threads.
# The steps run in that order, most important first, each with its own time limit and
# all of them within one budget (GPU_CHECK_SECONDS, 420 s): a step that would outrun
# what is left is cut to it, and a step with too little left is reported as not run.
# About 5 minutes in all is expected on 16 cores. Every step runs even if an earlier
# one failed, and the script exits non-zero if any failed or did not run.
# Everything goes to the log.
#
#   scripts/gpu_check.sh                 # log in ${OUT:-out}/gpu_check.log
#   PYTHON=/path/to/python GPU_CHECK_SECONDS=600 scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the benchmarks import minalign from here
export MINALIGN_EXPECT_EXTENSION=cuda  # a build that does not import fails the tests instead of skipping them

if [ -z "${PYTHON:-}" ]; then  # the first interpreter on the PATH that has torch
  for candidate in python3 python; do
    if command -v "$candidate" > /dev/null && "$candidate" -c "import torch" 2> /dev/null; then
      PYTHON=$(command -v "$candidate")
      break
    fi
  done
fi
if [ -z "${PYTHON:-}" ]; then
  echo "gpu_check: no python3 or python on the PATH imports torch; name one with PYTHON=" >&2
  exit 1
fi
LOG_DIR=${OUT:-out}
mkdir -p "$LOG_DIR"
LOG="$LOG_DIR/gpu_check.log"
: > "$LOG"
BUDGET=${GPU_CHECK_SECONDS:-420}
DEADLINE=$((SECONDS + BUDGET))
FAILED=()

step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  local left=$((DEADLINE - SECONDS - 10))  # 10 s kept for timeout's -k and the summary
  if [ "$left" -lt 10 ]; then
    echo -e "\n=== $name: NOT RUN (the ${BUDGET}s budget is spent)" | tee -a "$LOG"
    FAILED+=("$name (not run)")
    return
  fi
  [ "$limit" -le "$left" ] || limit=$left
  echo -e "\n=== $name ($(date +%T), limit ${limit}s): $*" | tee -a "$LOG"
  local start=$SECONDS
  timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$LOG"  # -k: SIGKILL 10 s after a SIGTERM ignored
  local rc=${PIPESTATUS[0]}
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then  # timeout's (137: killed by -k): reported apart from a failure
    echo "=== $name: TIMED OUT after $((SECONDS - start))s (limit ${limit}s)" | tee -a "$LOG"
    FAILED+=("$name (timed out)")
    return
  fi
  echo "=== $name: exit $rc after $((SECONDS - start))s" | tee -a "$LOG"
  [ "$rc" -eq 0 ] || FAILED+=("$name")
}

CUDA_TESTS=(tests/test_ops_logprobs.py tests/test_ops_logprobs_inplace.py tests/test_ops_logprobs_fused.py
            tests/test_ops_losses.py tests/test_ops_gae.py)

step "gpu" 20 nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv
# Build for this GPU only (fast); set TORCH_CUDA_ARCH_LIST to choose another list.
ARCH=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1)
step "build" 150 env MINALIGN_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-${ARCH:-9.0}}" MAX_JOBS="${MAX_JOBS:-16}" \
  "$PYTHON" setup.py build_ext --inplace
# setup.py links the libstdc++ that Python loads; a copy linked in statically (from a
# compiler newer than the system's) crashes at the first error message with a number.
step "libstdc++ linked dynamically" 10 sh -c 'readelf -d minalign/_C*.so | grep "NEEDED.*libstdc++"'
# Without this, a missing test package or an extension that does not import would make
# every CUDA test skip, and the steps below pass.
step "preflight" 30 "$PYTHON" -c "
import pytest, hypothesis, torch
from minalign import ops
assert torch.cuda.is_available(), 'torch sees no GPU'
assert ops.HAS_CUDA_KERNELS, f'minalign._C has no CUDA kernels: {ops._IMPORT_ERROR or \"built without CUDA\"}'
print(torch.__version__, torch.cuda.get_device_name(), 'CUDA kernels: yes', 'CPU kernels:', ops.cpu_kernels())"
step "cuda tests" 90 "$PYTHON" -m pytest -q -m "not slow" \
  -k "cuda or extension_was_built or every_op_has_a_kernel" "${CUDA_TESTS[@]}" tests/test_ops_api.py
# 4 GiB of logits, for offsets past 2^31 (apart, so that the step above reports in full).
step "cuda tests, 4 GiB inputs" 60 "$PYTHON" -m pytest -q -m slow -k cuda "${CUDA_TESTS[@]}"
step "bench logprobs" 120 "$PYTHON" bench/bench_logprobs.py --device cuda
step "bench gae" 30 "$PYTHON" bench/bench_gae.py --device cuda

# compute-sanitizer checks minalign's kernels alone (their mangled names hold
# "minalign"): torch's own kernels, which the tests and the reference launch, run
# uninstrumented, at full speed. CUDA API errors are not reported: torch probes the
# driver with calls that are meant to fail, and a failed launch of ours fails its test.
SANITIZER=$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")
SANITIZE=("$SANITIZER" --error-exitcode 1 --report-api-errors no --kernel-name kns=minalign)
# Some machines (virtualised ones) refuse the sanitizer: said once here, not as kernel errors.
failed_before=${#FAILED[@]}
step "compute-sanitizer runs here" 60 "${SANITIZE[@]}" --tool memcheck "$PYTHON" -c "
import torch
from minalign import ops
x = torch.randn(3, 5, device='cuda', requires_grad=True)
ops.token_logprobs(x, torch.tensor([0, 4, 2], device='cuda')).sum().backward()
torch.cuda.synchronize()
print('compute-sanitizer ran a minalign kernel')"
probe=""  # the probe's entry in FAILED, if it failed
[ ${#FAILED[@]} -eq "$failed_before" ] || probe=${FAILED[-1]}
if [ -n "$probe" ] && [[ "$probe" != *"(not run)" ]]; then
  FAILED+=("memcheck and racecheck (not run: compute-sanitizer does not run here)")
else
  # No caching allocator under memcheck, so that an overrun past a tensor is caught
  # instead of landing in a cached neighbour; nor can a CUDA graph be captured without it.
  step "memcheck" 90 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "${SANITIZE[@]}" --tool memcheck \
    "$PYTHON" -m pytest -q -x -m "not slow" -k "cuda and not opcheck and not cuda_graph" "${CUDA_TESTS[@]}"
  # Shared-memory hazards (the fused log-prob kernel caches each row there: all of it, part
  # of it, none of it), on rows small enough for racecheck's pace.
  step "racecheck" 60 "${SANITIZE[@]}" --tool racecheck \
    "$PYTHON" -m pytest -q -x -k "cuda and (cache_size or (matches_reference and not 50257))" tests/test_ops_logprobs_fused.py
  # The other kernels share memory only in their block reductions (softmax_cuda.cuh,
  # sum_cuda.cuh) and GAE's scan across warps.
  step "racecheck, reductions and scan" 60 "${SANITIZE[@]}" --tool racecheck \
    "$PYTHON" -m pytest -q -x -k "cuda and (matches_reference or by_hand) and not 50257" \
    tests/test_ops_logprobs.py tests/test_ops_losses.py tests/test_ops_gae.py
fi

echo -e "\nlog: $LOG" | tee -a "$LOG"
if [ ${#FAILED[@]} -gt 0 ]; then
  echo "FAILED: ${FAILED[*]}" | tee -a "$LOG"
  exit 1
fi
echo "all steps passed" | tee -a "$LOG"
