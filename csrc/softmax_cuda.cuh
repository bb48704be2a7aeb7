// The row-wise pieces that minalign's log-probability kernels share
// (logprobs_cuda.cu, logprobs_fused_cuda.cu): a softmax folded over a row in one
// pass, the split of a row into 16-byte vectors, the gradient of one logit, and
// the checks of the host functions' arguments.
//
// Online softmax (Milakov & Gimelshein 2018). A row is read once and folded into
// three running numbers, relative to the largest logit m seen so far:
//
//   sum = sum_j exp(x_j - m),   dot = sum_j exp(x_j - m) (x_j - m)
//
// When m grows to m' (shift = m - m' <= 0, scale = exp(shift)) every term's
// exponential is multiplied by scale and every (x_j - m) gains shift, so
//
//   sum' = scale sum,   dot' = scale (dot + shift sum).
//
// At the end lse = m + log(sum) and entropy = log(sum) - dot / sum. Keeping dot
// relative to m keeps both entropy terms small, so nothing large cancels.
// A logit of -inf has probability 0 and adds nothing (its exp is 0 and its
// 0 * (-inf) term in dot is skipped, not NaN). NaN and +inf end in NaN outputs,
// as log_softmax + gather give.
//
// Layout: one block of 256 threads per row. The row is split into an unaligned
// head (< 8 elements), a body of 16-byte vectors (8 bf16/fp16 or 4 fp32) read with
// one load each, several loads in flight per thread, and a tail (< 8 elements).
// Row starts are not 16-byte aligned in general (bf16 rows of V = 50,257 start
// every 100,514 bytes), so the split is computed per row from the row's address.
// All math is in float32.

#pragma once

#include "cuda_common.cuh"

#ifndef MINALIGN_CUDA_ON_CPU
#include <ATen/Dispatch.h>
#endif

#include <limits>
#include <utility>

namespace minalign {

constexpr int kThreads = 256;  // one block per row
constexpr int kWarps = kThreads / kWarpSize;
constexpr int kLoadsInFlight = 4;  // 16-byte loads each thread issues before using the first

// ------------------------------------------------------------- online softmax

// Softmax statistics of the part of a row seen so far (see the top of the file).
// sum == 0 means nothing but -inf has been seen; max is then meaningless.
struct SoftmaxStats {
  float max;
  float sum;
  float dot;  // only kept up to date when the entropy is wanted
};

__device__ __forceinline__ SoftmaxStats empty_stats() { return {-INFINITY, 0.f, 0.f}; }

// Re-express `s` relative to new_max >= s.max.
template <bool kEntropy>
__device__ __forceinline__ void rebase(SoftmaxStats& s, float new_max) {
  if (new_max == s.max) return;
  if (s.sum == 0.f) {  // nothing to rescale, and shift * sum could be -inf * 0
    s.max = new_max;
    return;
  }
  const float shift = s.max - new_max;  // < 0
  const float scale = exp2f(shift * kLog2e);
  // scale dot + (scale sum) shift: shift * sum alone overflows to -inf when max is near
  // float's lowest, and scale is then 0
  if constexpr (kEntropy) s.dot = scale * s.dot + (scale * s.sum) * shift;
  s.sum *= scale;
  s.max = new_max;
}

// Fold kN logits into `s`. The maximum is taken over the whole chunk first, so the
// running sums are rescaled at most once per chunk rather than once per element.
template <bool kEntropy, int kN>
__device__ __forceinline__ void fold(SoftmaxStats& s, const float (&x)[kN]) {
  float chunk_max = x[0];
#pragma unroll
  for (int j = 1; j < kN; ++j) chunk_max = fmaxf(chunk_max, x[j]);  // fmaxf skips NaN
  if (chunk_max == -INFINITY) {  // all -inf (probability 0), or -inf mixed with NaN
#pragma unroll
    for (int j = 0; j < kN; ++j) {
      if (x[j] != x[j]) s.sum = NAN;  // a NaN logit makes the row NaN
    }
    return;
  }
  rebase<kEntropy>(s, fmaxf(s.max, chunk_max));
#pragma unroll
  for (int j = 0; j < kN; ++j) {
    const float u = x[j] - s.max;  // <= 0 (-inf for a -inf logit, NaN for NaN/+inf)
    const float e = exp2f(u * kLog2e);
    s.sum += e;
    if constexpr (kEntropy) s.dot += (e == 0.f) ? 0.f : e * u;
  }
}

template <bool kEntropy>
__device__ __forceinline__ SoftmaxStats merge(SoftmaxStats a, SoftmaxStats b) {
  if (b.sum == 0.f) return a;
  if (a.sum == 0.f) return b;
  const float m = fmaxf(a.max, b.max);
  rebase<kEntropy>(a, m);
  rebase<kEntropy>(b, m);
  return {m, a.sum + b.sum, a.dot + b.dot};
}

// Merge the statistics of the warp (a butterfly: every lane ends with the result).
template <bool kEntropy>
__device__ __forceinline__ SoftmaxStats warp_merge(SoftmaxStats s) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    const SoftmaxStats other = {__shfl_xor_sync(kFullWarp, s.max, offset),
                                __shfl_xor_sync(kFullWarp, s.sum, offset),
                                __shfl_xor_sync(kFullWarp, s.dot, offset)};
    s = merge<kEntropy>(s, other);
  }
  return s;
}

// Merge the statistics of the whole block; the result is valid in thread 0.
template <bool kEntropy>
__device__ SoftmaxStats block_merge(SoftmaxStats s) {
  __shared__ SoftmaxStats per_warp[kWarps];
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  s = warp_merge<kEntropy>(s);
  if (lane == 0) per_warp[warp] = s;
  __syncthreads();
  if (warp == 0) s = warp_merge<kEntropy>(lane < kWarps ? per_warp[lane] : empty_stats());
  return s;
}

// ------------------------------------------------------------------ row layout

// A row as [head | kVec-wide aligned vectors | tail]; head and tail are shorter
// than one vector. Depends only on the row's address modulo 16 bytes.
struct RowSplit {
  int64_t head;      // elements before the first 16-byte boundary
  int64_t num_vecs;  // whole vectors after the head
  int64_t tail;      // index of the first element after the vectors
};

template <int kVec, typename scalar_t>
__device__ __forceinline__ RowSplit split_row(const scalar_t* row, int64_t V) {
  constexpr uintptr_t kVecBytes = sizeof(scalar_t) * kVec;
  const uintptr_t misalignment = reinterpret_cast<uintptr_t>(row) % kVecBytes;
  const int64_t to_boundary =
      static_cast<int64_t>((kVecBytes - misalignment) % kVecBytes / sizeof(scalar_t));
  RowSplit s;
  s.head = to_boundary < V ? to_boundary : V;
  s.num_vecs = (V - s.head) / kVec;
  s.tail = s.head + s.num_vecs * kVec;
  return s;
}

// Fold the `count` (< kVec) logits from `start` into `s`, padding with -inf.
template <bool kEntropy, int kVec, typename scalar_t>
__device__ __forceinline__ void fold_partial(SoftmaxStats& s, const scalar_t* row, int64_t start,
                                             int64_t count) {
  float x[kVec];
#pragma unroll
  for (int j = 0; j < kVec; ++j) x[j] = j < count ? static_cast<float>(row[start + j]) : -INFINITY;
  fold<kEntropy>(s, x);
}

// Fold one vector of logits into `s`.
template <bool kEntropy, typename scalar_t, int kVec>
__device__ __forceinline__ void fold_vector(SoftmaxStats& s, const Vec<scalar_t, kVec>& v) {
  float x[kVec];
#pragma unroll
  for (int j = 0; j < kVec; ++j) x[j] = static_cast<float>(v.v[j]);
  fold<kEntropy>(s, x);
}

// Calls f(v, k) for each vector v = body[k] of k in [begin, end) that falls to this
// thread (k = begin + threadIdx.x, then every kThreads), in that order. Each thread
// issues kLoads loads (kLoadsInFlight unless told) before the first call: one load at
// a time would leave the memory system idle for most of its latency.
template <int kLoads = kLoadsInFlight, typename VecT, typename F>
__device__ __forceinline__ void for_each_vector(const VecT* body, int64_t begin, int64_t end,
                                                F&& f) {
  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads * kLoads) {
    VecT v[kLoads];
#pragma unroll
    for (int u = 0; u < kLoads; ++u) {
      if (i + u * kThreads < end) v[u] = body[i + u * kThreads];
    }
#pragma unroll
    for (int u = 0; u < kLoads; ++u) {
      if (i + u * kThreads < end) f(v[u], i + u * kThreads);
    }
  }
}

// ------------------------------------------------------------ gradient of a logit

// The gradient of one logit, given the row's saved statistics.
template <bool kEntropy>
struct RowGrad {
  float lse;
  float g_logprob;
  float g_entropy;
  float ent_shift;    // entropy - lse, so x - lse + entropy == x + ent_shift
  int64_t hot_col;    // the label's column

  // The gradient of a logit x outside the label's column: -p weight.
  __device__ __forceinline__ float off_label(float x) const {
    const float p = exp2f((x - lse) * kLog2e);
    float weight = g_logprob;
    if constexpr (kEntropy) weight += g_entropy * (x + ent_shift);
    return (p == 0.f) ? 0.f : -p * weight;
  }

  __device__ __forceinline__ float operator()(float x, int64_t col) const {
    float g = off_label(x);
    if (col == hot_col) g += g_logprob;
    return g;
  }

  // The same for the vector of logits `v`, whose first column is col0, with the same
  // arithmetic; the label's column is looked for once per vector, not per element.
  template <typename scalar_t, int kVec>
  __device__ __forceinline__ Vec<scalar_t, kVec> operator()(const Vec<scalar_t, kVec>& v,
                                                            int64_t col0) const {
    const int64_t offset = hot_col - col0;
    const int hot_j = (offset >= 0 && offset < kVec) ? static_cast<int>(offset) : -1;
    Vec<scalar_t, kVec> out;
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      float g = off_label(static_cast<float>(v.v[j]));
      if (j == hot_j) g += g_logprob;
      out.v[j] = static_cast<scalar_t>(g);
    }
    return out;
  }
};

// Writes the gradient of the row's head and tail (threads 0 and kThreads - 1) to dx,
// which may be x itself.
template <bool kEntropy, typename scalar_t>
__device__ __forceinline__ void write_edge_grads(const RowGrad<kEntropy>& grad, const scalar_t* x,
                                                 scalar_t* dx, int64_t V, const RowSplit& split) {
  if (threadIdx.x == 0) {
    for (int64_t c = 0; c < split.head; ++c) {
      dx[c] = static_cast<scalar_t>(grad(static_cast<float>(x[c]), c));
    }
  }
  if (threadIdx.x == kThreads - 1) {
    for (int64_t c = split.tail; c < V; ++c) {
      dx[c] = static_cast<scalar_t>(grad(static_cast<float>(x[c]), c));
    }
  }
}

// Zeros over a whole row laid out as `split` says.
template <int kVec, typename scalar_t>
__device__ void zero_row(scalar_t* dx, int64_t V, const RowSplit& split) {
  using VecT = Vec<scalar_t, kVec>;
  if (threadIdx.x == 0) {
    for (int64_t c = 0; c < split.head; ++c) dx[c] = scalar_t(0.f);
  }
  if (threadIdx.x == kThreads - 1) {
    for (int64_t c = split.tail; c < V; ++c) dx[c] = scalar_t(0.f);
  }
  VecT zeros;
#pragma unroll
  for (int j = 0; j < kVec; ++j) zeros.v[j] = scalar_t(0.f);
  VecT* dbody = as_vectors<VecT>(dx + split.head, split.num_vecs);
  for (int64_t i = threadIdx.x; i < split.num_vecs; i += kThreads) dbody[i] = zeros;
}

// ------------------------------------------------------------------------ host
#ifndef MINALIGN_CUDA_ON_CPU

#define MINALIGN_DISPATCH_LOGITS(TYPE, NAME, ...)          \
  AT_DISPATCH_SWITCH(TYPE, NAME,                           \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

// Checks logits [N, V] and labels [N]; returns N and V.
inline std::pair<int64_t, int64_t> check_logits_and_labels(const char* op,
                                                           const at::Tensor& logits,
                                                           const at::Tensor& labels) {
  TORCH_CHECK(logits.is_cuda(), op, ": logits must be a CUDA tensor, got one on ",
              logits.device());
  TORCH_CHECK(logits.dim() == 2, op,
              ": logits must be 2-D [N, V] (flatten batch and time first), got shape ",
              logits.sizes());
  const auto dtype = logits.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, op,
              ": logits must be float32, bfloat16 or float16, got ", dtype_name(dtype));
  TORCH_CHECK(logits.is_contiguous(), op,
              ": logits must be contiguous (call .contiguous() on it first)");
  const int64_t N = logits.size(0);
  const int64_t V = logits.size(1);
  TORCH_CHECK(N > 0, op, ": empty batch (logits has 0 rows)");
  TORCH_CHECK(V > 0, op, ": empty vocabulary (logits has 0 columns)");
  TORCH_CHECK(N <= std::numeric_limits<int32_t>::max(), op, ": at most 2^31 - 1 rows, got ", N);
  check_cuda_input(labels, op, "labels", at::kLong, logits);
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == N, op,
              ": labels must be 1-D [N] with N = logits.size(0) = ", N, ", got shape ",
              labels.sizes());
  return {N, V};
}

// Raises if a kernel recorded a row with an out-of-range label (first_bad_row < N).
inline void check_first_bad_row(const char* op, const at::Tensor& first_bad_row,
                                const at::Tensor& labels, int64_t V, int64_t ignore_index) {
  const int64_t bad_row = first_bad_row.item<int64_t>();  // waits for the kernel
  TORCH_CHECK(bad_row == labels.size(0), op, ": labels[", bad_row, "] = ",
              labels[bad_row].item<int64_t>(), " is out of range: labels must be in [0, ", V,
              ") or equal ignore_index = ", ignore_index);
}

// An [N] float32 tensor saved or produced by autograd; upstream gradients may be
// expanded views, and making N floats contiguous costs nothing.
inline at::Tensor row_vector(const char* op, const char* name, const at::Tensor& t,
                             const at::Tensor& logits, int64_t N) {
  at::Tensor c = t.contiguous();
  check_cuda_input(c, op, name, at::kFloat, logits);
  TORCH_CHECK(c.dim() == 1 && c.size(0) == N, op, ": ", name, " must have shape [", N, "], got ",
              c.sizes());
  return c;
}
#endif

}  // namespace minalign
