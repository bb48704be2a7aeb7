#!/usr/bin/env bash
# One command for a machine with an NVIDIA GPU: build the CUDA extension, run the
# CUDA tests, run them again under compute-sanitizer memcheck (0 errors expected),
# run the kernels that share memory between threads under racecheck, and run the
# benchmarks on the GPU.
# Each step has a time limit, so that a hung step cannot hold the machine (about 3
# minutes in all on an H100; 10 if every step ran to its limit); every step
# runs even if an earlier one failed, and the script exits non-zero if any failed.
# Everything goes to the log.
#
#   scripts/gpu_check.sh                 # log in ${OUT:-out}/gpu_check.log
#   PYTHON=/path/to/python scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the benchmarks import minalign from here
export MINALIGN_EXPECT_EXTENSION=cuda  # a build that does not import fails the tests instead of skipping them

PYTHON=${PYTHON:-$(command -v python || command -v python3)}
LOG_DIR=${OUT:-out}
mkdir -p "$LOG_DIR"
LOG="$LOG_DIR/gpu_check.log"
: > "$LOG"
FAILED=()

step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
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

SANITIZER=$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")
CUDA_TESTS=(tests/test_ops_logprobs.py tests/test_ops_logprobs_inplace.py tests/test_ops_logprobs_fused.py
            tests/test_ops_losses.py tests/test_ops_gae.py)

step "gpu" 20 nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv
# Build for this GPU only (fast); set TORCH_CUDA_ARCH_LIST to choose another list.
ARCH=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1)
step "build" 120 env MINALIGN_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-${ARCH:-9.0}}" MAX_JOBS="${MAX_JOBS:-16}" \
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
print(torch.__version__, torch.cuda.get_device_name(), 'CUDA kernels: yes')"
step "cuda tests" 80 "$PYTHON" -m pytest -q -k "cuda or extension_was_built" "${CUDA_TESTS[@]}" tests/test_ops_api.py
step "bench logprobs" 90 "$PYTHON" bench/bench_logprobs.py --device cuda
step "bench gae" 30 "$PYTHON" bench/bench_gae.py --device cuda
# No caching allocator under memcheck, so that an overrun past a tensor is caught
# instead of landing in a cached neighbour. The slow-marked tests (4 GiB of logits, for
# offsets past 2^31) ran in "cuda tests"; under memcheck they would not fit the limit,
# nor can a CUDA graph be captured without the caching allocator.
step "memcheck" 80 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool memcheck --error-exitcode 1 \
  "$PYTHON" -m pytest -q -x -m "not slow" -k "cuda and not opcheck and not cuda_graph" "${CUDA_TESTS[@]}"
# Shared-memory hazards (the fused log-prob kernel caches each row there: all of it, part
# of it, none of it), on rows small enough for racecheck's pace.
step "racecheck" 40 "$SANITIZER" --tool racecheck --error-exitcode 1 \
  "$PYTHON" -m pytest -q -x -k "cuda and (cache_size or (matches_reference and not 50257))" tests/test_ops_logprobs_fused.py
# The other kernels share memory only in their block reductions (softmax_cuda.cuh,
# sum_cuda.cuh) and GAE's scan across warps.
step "racecheck, reductions and scan" 45 "$SANITIZER" --tool racecheck --error-exitcode 1 \
  "$PYTHON" -m pytest -q -x -k "cuda and (matches_reference or by_hand) and not 50257" \
  tests/test_ops_logprobs.py tests/test_ops_losses.py tests/test_ops_gae.py

echo -e "\nlog: $LOG" | tee -a "$LOG"
if [ ${#FAILED[@]} -gt 0 ]; then
  echo "FAILED: ${FAILED[*]}" | tee -a "$LOG"
  exit 1
fi
echo "all steps passed" | tee -a "$LOG"
