// Shared by the CPU log-prob kernels (logprobs_cpu.cpp, logprobs_fused_cpu.cpp): one
// row's online log-sum-exp and its gradient, block by block, and the checks. The
// vectorised loops over a block (sweeps, gradient, 16-bit conversions) are
// cpu_blocks.h's, built once per ISA.
//
// Online log-sum-exp with a lazy reference: keep a reference M, s = sum e^{x_j - M}
// and, for the entropy, t = sum e^{x_j - M} (x_j - M). Any M gives
//   lse = M + log s,   H = log s - t / s,
// as long as no e^{x_j - M} overflows. So M need not be the running max: it is the
// max of the first block of the row, and is only raised when a later block's max
// exceeds it by more than kSlack (each term then stays below e^kSlack). Raising it
// to M' rescales the terms so far by c = e^{M - M'}: s' = c s, t' = c t + c s (M - M').
// With M fixed, one sweep over a block takes its max and its sums together; only the
// first block, or one whose max jumps, is swept twice (the second time from L1).
//
// Speed: rows are shared among torch's intra-op threads (at::parallel_for). Two cores
// read memory at about 21 GB/s (one alone at 12), and e^x costs about 16 vector
// instructions per vector of floats, so a sweep is close to memory-bound only if the
// loads never wait. The hardware prefetcher alone runs too few cache lines ahead, so
// the loops prefetch 8 KiB ahead; with that the forward reads the logits at nearly the
// speed of a plain sum (with AVX-512).
// Accumulation is in float32; bfloat16 and float16 logits are widened block by block.

#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>

#include "cpu_blocks.h"
#include "dtype_name.h"

namespace minalign {
namespace {  // each kernel file gets its own copy: nothing here is exported

constexpr int64_t kBlock = 2048;  // floats per block: 8 KiB, stays in L1 for a second sweep
constexpr float kSlack = 16.f;  // terms stay below e^16 = 8.9e6, so s < V e^16 cannot overflow
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Running state of one row's online log-sum-exp: M, s and t above.
struct RowState {
  float ref = kNegInf;  // -inf until a block with a finite max has been seen
  float sum = 0.f;
  float xsum = 0.f;
};

// Folds n logits (one block of a row) into the row's state. Unless `keep` is null, the
// block's terms e^{x - M} are written there, M being st.ref after the call (0 while that
// is -inf).
void fold_block(const float* x, int64_t n, bool with_entropy, bool ahead, RowState& st, float* keep = nullptr) {
  const CpuBlocks& blocks = cpu_blocks();
  float block_max;
  if (st.ref != kNegInf) {  // the common case: one sweep
    const BlockSums b = blocks.sweep(x, n, st.ref, with_entropy, ahead, keep);
    if (!(b.max > st.ref + kSlack)) {
      st.sum += b.sum;
      st.xsum += b.xsum;
      return;
    }
    block_max = b.max;  // too far above the reference: raise it and sweep again
  } else {
    block_max = blocks.max(x, n);
  }
  if (block_max > st.ref) {
    if (st.sum != 0.f) {  // rescale the terms so far (also taken when sum is NaN)
      const float c = std::exp(st.ref - block_max);
      // c t + (c s)(M - M'), not c (t + s (M - M')): s (M - M') overflows to -inf when M
      // is near float's lowest, and c is then 0; c s stays finite.
      st.xsum = c * st.xsum + (c * st.sum) * (st.ref - block_max);
      st.sum *= c;
    }
    st.ref = block_max;
  }
  const float m = st.ref == kNegInf ? 0.f : st.ref;  // only -inf so far: e^{-inf - 0} = 0
  const BlockSums b = blocks.sweep(x, n, m, with_entropy, false, keep);
  st.sum += b.sum;
  st.xsum += b.xsum;
}

// Writes the gradient of n logits (one block of a row), without the [j = y] term.
// out may be x itself.
void grad_block(const float* x, int64_t n, float lse, float g, float gh, float entropy, bool ahead,
                float* out) {
  cpu_blocks().grad(x, n, lse, g, gh, entropy, ahead, out);
}

// bfloat16 and float16 blocks rounded from floats.
template <typename T>
void round_block(const float* src, int64_t n, T* dst) {
  cpu_blocks().round(src, n, std::is_same_v<T, at::BFloat16>, reinterpret_cast<uint16_t*>(dst));
}

// A block of logits as floats: the data itself for float32, else widened into buf.
const float* as_float(const float* src, int64_t, float*) { return src; }
template <typename T>
const float* as_float(const T* src, int64_t n, float* buf) {
  cpu_blocks().widen(reinterpret_cast<const uint16_t*>(src), n, std::is_same_v<T, at::BFloat16>, buf);
  return buf;
}

int64_t rows_per_task(int64_t V) { return std::max<int64_t>(1, at::internal::GRAIN_SIZE / V); }

// Calls f(T{}) with T the C++ type of the logits' dtype.
template <typename F>
void dispatch_logits(const char* op, at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kFloat: return f(float{});
    case at::kBFloat16: return f(at::BFloat16{});
    case at::kHalf: return f(at::Half{});
    default: TORCH_CHECK(false, op, ": logits must be float32, bfloat16 or float16, got ", dtype_name(dtype));
  }
}

// Checks logits [N, V] and labels [N] for the op named `op`, labels' range included.
void check_inputs(const char* op, const at::Tensor& logits, const at::Tensor& labels, int64_t ignore_index) {
  TORCH_CHECK(logits.dim() == 2, op, ": logits must be 2-D [N, V], got shape ", logits.sizes());
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == logits.size(0), op,
              ": labels must be 1-D [N] with N = logits.size(0) = ", logits.size(0), ", got shape ", labels.sizes());
  TORCH_CHECK(labels.scalar_type() == at::kLong, op, ": labels must be int64, got ",
              dtype_name(labels.scalar_type()));
  TORCH_CHECK(logits.device().is_cpu() && labels.device().is_cpu(), op,
              ": logits and labels must both be on the CPU, got ", logits.device(), " and ", labels.device());
  TORCH_CHECK(logits.size(0) > 0, op, ": empty batch (logits has 0 rows)");
  TORCH_CHECK(logits.size(1) > 0, op, ": empty vocabulary (logits has 0 columns)");
  TORCH_CHECK(logits.is_contiguous(), op, ": logits must be contiguous (call .contiguous())");
  TORCH_CHECK(labels.is_contiguous(), op, ": labels must be contiguous (call .contiguous())");
  const int64_t V = logits.size(1);
  const int64_t* y = labels.const_data_ptr<int64_t>();
  for (int64_t r = 0; r < labels.size(0); ++r)
    TORCH_CHECK(y[r] == ignore_index || (0 <= y[r] && y[r] < V), op, ": labels[", r, "] = ", y[r],
                " is out of range: labels must be in [0, ", V, ") or equal ignore_index = ", ignore_index);
}

}  // namespace
}  // namespace minalign
