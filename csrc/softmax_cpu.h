// Shared by the CPU log-prob kernels (logprobs_cpu.cpp, logprobs_fused_cpu.cpp): one
// row's online log-sum-exp, its gradient block by block, 16-bit widening, the checks.
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
// read memory at about 21 GB/s (one alone at 12), and e^x costs about 20 vector
// instructions per 16 floats, so a sweep is close to memory-bound only if the loads
// never wait. The hardware prefetcher alone runs too few cache lines ahead, so the
// loops prefetch kPrefetchAhead floats ahead; with that the forward reads the logits
// at nearly the speed of a plain sum.
// Accumulation is in float32; bfloat16 and float16 logits are widened block by block.

#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>

#include "cpu_simd.h"
#include "dtype_name.h"

namespace minalign {
namespace {  // each kernel file gets its own copy: nothing here is exported

constexpr int64_t kBlock = 2048;  // floats per block: 8 KiB, stays in L1 for a second sweep
constexpr int64_t kPrefetchAhead = 2048;  // floats: the loops ask for the cache line 8 KiB ahead
constexpr float kSlack = 16.f;  // terms stay below e^16 = 8.9e6, so s < V e^16 cannot overflow
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Asks for the cache line holding p, into L2 (prefetches never fault, so p may lie past
// the end of the logits).
MINALIGN_INLINE void prefetch(const void* p) { __builtin_prefetch(p, 0, 2); }

// Running state of one row's online log-sum-exp: M, s and t above.
struct RowState {
  float ref = kNegInf;  // -inf until a block with a finite max has been seen
  float sum = 0.f;
  float xsum = 0.f;
};

// The max of a block and its two sums relative to a reference m.
struct BlockSums {
  float max;
  float sum;   // sum e^{x - m}
  float xsum;  // sum e^{x - m} (x - m), when the entropy is wanted
};

// One sweep over n logits. `ahead` turns on the prefetch (off when x is a widened copy).
MINALIGN_SIMD_CLONES
BlockSums sweep_block(const float* x, int64_t n, float m, bool with_entropy, bool ahead) {
  f32x16 block_max = splat(kNegInf), s = splat(0.f), t = splat(0.f);
  for (int64_t i = 0; i < n; i += 16) {
    if (ahead) prefetch(x + i + kPrefetchAhead);
    f32x16 v = i + 16 <= n ? load16(x + i) : load16_partial(x + i, n - i, kNegInf);
    block_max = vmax(block_max, v);  // ignores NaN, which surfaces in the sums
    f32x16 d = v - m;                // <= kSlack, or the block is swept again
    f32x16 e = exp16(d);
    s += e;
    if (with_entropy) t += select(e == 0.f, splat(0.f), e * d);  // 0 * -inf counts as 0
  }
  return {hmax(block_max), hsum(s), hsum(t)};
}

MINALIGN_SIMD_CLONES
float max_block(const float* x, int64_t n) {
  f32x16 block_max = splat(kNegInf);
  for (int64_t i = 0; i < n; i += 16)
    block_max = vmax(block_max, i + 16 <= n ? load16(x + i) : load16_partial(x + i, n - i, kNegInf));
  return hmax(block_max);
}

// Folds n logits (one block of a row) into the row's state.
void fold_block(const float* x, int64_t n, bool with_entropy, bool ahead, RowState& st) {
  float block_max;
  if (st.ref != kNegInf) {  // the common case: one sweep
    const BlockSums b = sweep_block(x, n, st.ref, with_entropy, ahead);
    if (!(b.max > st.ref + kSlack)) {
      st.sum += b.sum;
      st.xsum += b.xsum;
      return;
    }
    block_max = b.max;  // too far above the reference: raise it and sweep again
  } else {
    block_max = max_block(x, n);
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
  const BlockSums b = sweep_block(x, n, m, with_entropy, false);
  st.sum += b.sum;
  st.xsum += b.xsum;
}

// Writes the gradient of n logits (one block of a row), without the [j = y] term.
// out may be x itself: each vector is read before it is overwritten.
MINALIGN_SIMD_CLONES
void grad_block(const float* x, int64_t n, float lse, float g, float gh, float entropy, bool ahead,
                float* out) {
  for (int64_t i = 0; i < n; i += 16) {
    if (ahead) prefetch(x + i + kPrefetchAhead);
    f32x16 v = i + 16 <= n ? load16(x + i) : load16_partial(x + i, n - i, kNegInf);
    f32x16 d = v - lse;  // log p
    f32x16 p = exp16(d);
    f32x16 grad = gh == 0.f ? -g * p : select(p == 0.f, splat(0.f), -p * (g + gh * (d + entropy)));
    if (i + 16 <= n) store16(out + i, grad);
    else store16_partial(out + i, n - i, grad);
  }
}

// bfloat16 and float16 blocks widened to float and rounded back, 16 values at a time.
MINALIGN_INLINE f32x16 widen16(u16x16 h, at::BFloat16) { return bf16_to_f32(h); }
MINALIGN_INLINE f32x16 widen16(u16x16 h, at::Half) { return f16_to_f32(h); }
MINALIGN_INLINE u16x16 round16(f32x16 v, at::BFloat16) { return f32_to_bf16(v); }
MINALIGN_INLINE u16x16 round16(f32x16 v, at::Half) { return f32_to_f16(v); }

template <typename T>
MINALIGN_SIMD_CLONES
void widen_block(const T* src, int64_t n, float* dst) {
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(src);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    prefetch(bits + i + 2 * kPrefetchAhead);  // 8 KiB ahead, as for float32
    store16(dst + i, widen16(load16_bits(bits + i), T{}));
  }
  if (i < n) store16_partial(dst + i, n - i, widen16(load16_bits_partial(bits + i, n - i), T{}));
}

template <typename T>
MINALIGN_SIMD_CLONES
void round_block(const float* src, int64_t n, T* dst) {
  uint16_t* bits = reinterpret_cast<uint16_t*>(dst);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) store16_bits(bits + i, round16(load16(src + i), T{}));
  if (i < n) store16_bits_partial(bits + i, n - i, round16(load16_partial(src + i, n - i, 0.f), T{}));
}

// A block of logits as floats: the data itself for float32, else widened into buf.
const float* as_float(const float* src, int64_t, float*) { return src; }
template <typename T>
const float* as_float(const T* src, int64_t n, float* buf) {
  widen_block(src, n, buf);
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
