// token_logprobs on the CPU: log p(label) of each row of logits, the row's
// log-sum-exp, optionally its entropy, and the gradient of those w.r.t. the logits.
//
// For one row x of V logits and its label y:
//   lse    = log sum_j e^{x_j}
//   logp_y = x_y - lse
//   H      = -sum_j p_j log p_j,   p_j = e^{x_j - lse}   (0 log 0 = 0: -inf logits add 0)
// Backward, with upstream gradients g (of logp_y) and gh (of H):
//   d logp_y / dx_j = [j = y] - p_j
//   d H / dx_j      = -p_j (log p_j + H)
//   grad_j          = g [j = y] - p_j (g + gh (x_j - lse + H))
// Rows whose label is ignore_index get logp 0, entropy 0 and a zero gradient.
//
// Never materialised: the [N, V] softmax or log-softmax. The forward reads each row
// once, the backward reads it once more, recomputes p_j from the saved lse and writes
// the gradient, either into a new tensor or (token_logprobs_backward_) over the
// logits themselves. Extra memory: O(N).
//
// Online log-sum-exp with a lazy reference: keep a reference M, s = sum e^{x_j - M}
// and, for the entropy, t = sum e^{x_j - M} (x_j - M). Any M gives
//   lse = M + log s,   H = log s - t / s,
// as long as no e^{x_j - M} overflows. So M need not be the running max: it is the
// max of the first block of the row, and is only raised when a later block's max
// exceeds it by more than kSlack (each term then stays below e^kSlack). Raising it
// to M' rescales the terms so far by c = e^{M - M'}: s' = c s, t' = c (t + s (M - M')).
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

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>

#include "cpu_simd.h"
#include "dtype_name.h"

namespace minalign {
namespace {

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

template <typename T>
void forward_rows(const at::Tensor& logits, const int64_t* labels, int64_t ignore_index,
                  bool with_entropy, float* logprobs, float* lse, float* entropy) {
  const int64_t N = logits.size(0), V = logits.size(1);
  const T* x = logits.const_data_ptr<T>();
  at::parallel_for(0, N, rows_per_task(V), [&](int64_t begin, int64_t end) {
    float buf[kBlock];
    for (int64_t r = begin; r < end; ++r) {
      const T* row = x + r * V;  // int64 offset: N * V may exceed 2^31
      RowState st;
      for (int64_t j = 0; j < V; j += kBlock) {
        const int64_t n = std::min(kBlock, V - j);
        fold_block(as_float(row + j, n, buf), n, with_entropy, std::is_same_v<T, float>, st);
      }
      const float log_sum = std::log(st.sum);
      lse[r] = st.ref + log_sum;
      const bool ignored = labels[r] == ignore_index;
      logprobs[r] = ignored ? 0.f : static_cast<float>(row[labels[r]]) - lse[r];
      if (with_entropy) entropy[r] = ignored ? 0.f : log_sum - st.xsum / st.sum;
    }
  });
}

template <typename T>
void backward_rows(const at::Tensor& logits, const int64_t* labels, int64_t ignore_index,
                   const float* grad_logprobs, const float* grad_entropy, const float* lse,
                   const float* entropy, at::Tensor& grad_logits) {
  const int64_t N = logits.size(0), V = logits.size(1);
  const T* x = logits.const_data_ptr<T>();
  T* out = grad_logits.mutable_data_ptr<T>();
  at::parallel_for(0, N, rows_per_task(V), [&](int64_t begin, int64_t end) {
    float buf[kBlock], grad_buf[kBlock];
    for (int64_t r = begin; r < end; ++r) {
      const T* row = x + r * V;
      T* out_row = out + r * V;
      const int64_t y = labels[r];
      if (y == ignore_index) {
        std::fill(out_row, out_row + V, T(0));
        continue;
      }
      const float g = grad_logprobs[r];
      const float gh = grad_entropy ? grad_entropy[r] : 0.f;
      const float h = grad_entropy ? entropy[r] : 0.f;
      for (int64_t j = 0; j < V; j += kBlock) {
        const int64_t n = std::min(kBlock, V - j);
        float* o = std::is_same_v<T, float> ? reinterpret_cast<float*>(out_row + j) : grad_buf;
        grad_block(as_float(row + j, n, buf), n, lse[r], g, gh, h, std::is_same_v<T, float>, o);
        if (j <= y && y < j + n) o[y - j] += g;
        if constexpr (!std::is_same_v<T, float>)
          round_block(o, n, out_row + j);
      }
    }
  });
}

// token_logprobs_fused_: log p(label) of each row and, in the same visit to the row, the
// gradient of sum_r w_r logp_r written over the logits: w_r ([j = y_r] - p_rj). The row
// (V = 50,257 float32 is 200 KB) is read from memory once, for its log-sum-exp, then
// read again from the core's 2 MB L2 and overwritten, so the memory traffic is one read
// and one write of the logits where a forward and a separate backward need two reads.
// The second pass computes p = e^{x - lse} again, as the backward does, so the gradient
// is bit for bit that of token_logprobs and token_logprobs_backward with g = w.
template <typename T>
void fused_rows(at::Tensor& logits, const int64_t* labels, int64_t ignore_index, const float* weights,
                float* logprobs) {
  const int64_t N = logits.size(0), V = logits.size(1);
  T* x = logits.mutable_data_ptr<T>();
  constexpr bool kFloat = std::is_same_v<T, float>;
  at::parallel_for(0, N, rows_per_task(V), [&](int64_t begin, int64_t end) {
    float buf[kBlock];
    for (int64_t r = begin; r < end; ++r) {
      T* row = x + r * V;
      const int64_t y = labels[r];
      if (y == ignore_index) {
        logprobs[r] = 0.f;
        std::fill(row, row + V, T(0));
        continue;
      }
      RowState st;
      for (int64_t j = 0; j < V; j += kBlock) {
        const int64_t n = std::min(kBlock, V - j);
        fold_block(as_float(row + j, n, buf), n, false, kFloat, st);
      }
      const float lse = st.ref + std::log(st.sum);
      logprobs[r] = static_cast<float>(row[y]) - lse;
      const float w = weights[r];
      for (int64_t j = 0; j < V; j += kBlock) {  // from L2 now: no prefetch
        const int64_t n = std::min(kBlock, V - j);
        float* o = kFloat ? reinterpret_cast<float*>(row + j) : buf;
        grad_block(as_float(row + j, n, buf), n, lse, w, 0.f, 0.f, false, o);
        if (j <= y && y < j + n) o[y - j] += w;
        if constexpr (!kFloat)
          round_block(buf, n, row + j);
      }
    }
  });
}

// Calls f(T{}) with T the C++ type of the logits' dtype.
template <typename F>
void dispatch_logits(at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kFloat: return f(float{});
    case at::kBFloat16: return f(at::BFloat16{});
    case at::kHalf: return f(at::Half{});
    default: TORCH_CHECK(false, "minalign.token_logprobs: logits must be float32, bfloat16 or float16, got ", dtype_name(dtype));
  }
}

void check_inputs(const at::Tensor& logits, const at::Tensor& labels, int64_t ignore_index) {
  TORCH_CHECK(logits.dim() == 2, "minalign.token_logprobs: logits must be 2-D [N, V], got shape ", logits.sizes());
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == logits.size(0),
              "minalign.token_logprobs: labels must be 1-D [N] with N = logits.size(0) = ", logits.size(0),
              ", got shape ", labels.sizes());
  TORCH_CHECK(labels.scalar_type() == at::kLong, "minalign.token_logprobs: labels must be int64, got ", dtype_name(labels.scalar_type()));
  TORCH_CHECK(logits.device().is_cpu() && labels.device().is_cpu(),
              "minalign.token_logprobs: logits and labels must be on the same device, got ", logits.device(),
              " and ", labels.device());
  TORCH_CHECK(logits.size(0) > 0, "minalign.token_logprobs: empty batch (logits has 0 rows)");
  TORCH_CHECK(logits.size(1) > 0, "minalign.token_logprobs: empty vocabulary (logits has 0 columns)");
  TORCH_CHECK(logits.is_contiguous(), "minalign.token_logprobs: logits must be contiguous (call .contiguous())");
  TORCH_CHECK(labels.is_contiguous(), "minalign.token_logprobs: labels must be contiguous (call .contiguous())");
  const int64_t V = logits.size(1);
  const int64_t* y = labels.const_data_ptr<int64_t>();
  for (int64_t r = 0; r < labels.size(0); ++r)
    TORCH_CHECK(y[r] == ignore_index || (0 <= y[r] && y[r] < V), "minalign.token_logprobs: labels[", r, "] = ", y[r],
                " is out of range: labels must be in [0, ", V, ") or equal ignore_index = ", ignore_index);
}

void check_row_vector(const at::Tensor& t, const char* name, int64_t N) {
  TORCH_CHECK(t.scalar_type() == at::kFloat, "minalign.token_logprobs_backward: ", name, " must be float32, got ", dtype_name(t.scalar_type()));
  TORCH_CHECK(t.dim() == 1 && t.size(0) == N, "minalign.token_logprobs_backward: ", name, " must have shape [", N, "], got ", t.sizes());
  TORCH_CHECK(t.device().is_cpu(), "minalign.token_logprobs_backward: ", name, " must be on the CPU like the logits, got ", t.device());
  TORCH_CHECK(t.is_contiguous(), "minalign.token_logprobs_backward: ", name, " must be contiguous");
}

// inplace_backward only tells autograd which backward to run.
std::tuple<at::Tensor, at::Tensor, at::Tensor> token_logprobs_cpu(const at::Tensor& logits, const at::Tensor& labels,
                                                                  int64_t ignore_index, bool with_entropy,
                                                                  bool /*inplace_backward*/) {
  check_inputs(logits, labels, ignore_index);
  const int64_t N = logits.size(0);
  auto opts = logits.options().dtype(at::kFloat);
  at::Tensor logprobs = at::empty({N}, opts), lse = at::empty({N}, opts);
  at::Tensor entropy = at::empty({with_entropy ? N : 0}, opts);
  dispatch_logits(logits.scalar_type(), [&](auto t) {
    forward_rows<decltype(t)>(logits, labels.const_data_ptr<int64_t>(), ignore_index, with_entropy,
                              logprobs.mutable_data_ptr<float>(), lse.mutable_data_ptr<float>(),
                              with_entropy ? entropy.mutable_data_ptr<float>() : nullptr);
  });
  return {logprobs, lse, entropy};
}

// Writes the gradient into grad_logits, which may be logits itself.
void backward_into(const at::Tensor& grad_logprobs, const std::optional<at::Tensor>& grad_entropy,
                   const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& lse,
                   const std::optional<at::Tensor>& entropy, int64_t ignore_index, at::Tensor& grad_logits) {
  check_inputs(logits, labels, ignore_index);
  const int64_t N = logits.size(0);
  check_row_vector(grad_logprobs, "grad_logprobs", N);
  check_row_vector(lse, "lse", N);
  const bool with_entropy = grad_entropy.has_value() && grad_entropy->defined();
  if (with_entropy) {
    TORCH_CHECK(entropy.has_value() && entropy->defined(),
                "minalign.token_logprobs_backward: grad_entropy was given without the saved entropy");
    check_row_vector(*grad_entropy, "grad_entropy", N);
    check_row_vector(*entropy, "entropy", N);
  }
  dispatch_logits(logits.scalar_type(), [&](auto t) {
    backward_rows<decltype(t)>(logits, labels.const_data_ptr<int64_t>(), ignore_index,
                               grad_logprobs.const_data_ptr<float>(),
                               with_entropy ? grad_entropy->const_data_ptr<float>() : nullptr,
                               lse.const_data_ptr<float>(), with_entropy ? entropy->const_data_ptr<float>() : nullptr,
                               grad_logits);
  });
}

at::Tensor token_logprobs_backward_cpu(const at::Tensor& grad_logprobs, const std::optional<at::Tensor>& grad_entropy,
                                       const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& lse,
                                       const std::optional<at::Tensor>& entropy, int64_t ignore_index) {
  at::Tensor grad_logits = at::empty_like(logits);
  backward_into(grad_logprobs, grad_entropy, logits, labels, lse, entropy, ignore_index, grad_logits);
  return grad_logits;
}

// The same gradient, written over the logits (memory already touched: no new [N, V] tensor).
void token_logprobs_backward_inplace_cpu(const at::Tensor& grad_logprobs, const std::optional<at::Tensor>& grad_entropy,
                                         at::Tensor& logits, const at::Tensor& labels, const at::Tensor& lse,
                                         const std::optional<at::Tensor>& entropy, int64_t ignore_index) {
  backward_into(grad_logprobs, grad_entropy, logits, labels, lse, entropy, ignore_index, logits);
}

at::Tensor token_logprobs_fused_cpu(at::Tensor& logits, const at::Tensor& labels, const at::Tensor& weights,
                                    int64_t ignore_index) {
  check_inputs(logits, labels, ignore_index);
  const int64_t N = logits.size(0);
  TORCH_CHECK(weights.scalar_type() == at::kFloat, "minalign.token_logprobs_fused_: weights must be float32, got ",
              dtype_name(weights.scalar_type()));
  TORCH_CHECK(weights.dim() == 1 && weights.size(0) == N, "minalign.token_logprobs_fused_: weights must have shape [",
              N, "], got ", weights.sizes());
  TORCH_CHECK(weights.device().is_cpu() && weights.is_contiguous(),
              "minalign.token_logprobs_fused_: weights must be a contiguous CPU tensor like the logits");
  at::Tensor logprobs = at::empty({N}, logits.options().dtype(at::kFloat));
  dispatch_logits(logits.scalar_type(), [&](auto t) {
    fused_rows<decltype(t)>(logits, labels.const_data_ptr<int64_t>(), ignore_index, weights.const_data_ptr<float>(),
                            logprobs.mutable_data_ptr<float>());
  });
  return logprobs;
}

}  // namespace

TORCH_LIBRARY_IMPL(minalign, CPU, m) {
  m.impl("token_logprobs_fused_", &token_logprobs_fused_cpu);
  m.impl("token_logprobs", &token_logprobs_cpu);
  m.impl("token_logprobs_backward", &token_logprobs_backward_cpu);
  m.impl("token_logprobs_backward_", &token_logprobs_backward_inplace_cpu);
}

}  // namespace minalign
