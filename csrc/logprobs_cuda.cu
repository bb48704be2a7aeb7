// Per-token log-probabilities, log-sum-exp and entropy of a row of logits, on the GPU.
//
// For each row i of logits x [N, V] and its label y_i:
//
//   lse_i      = log sum_j exp(x_ij)
//   logprob_i  = x_iy - lse_i                  (0 where y_i == ignore_index)
//   entropy_i  = -sum_j p_ij log p_ij = lse_i - sum_j p_ij x_ij,   p_ij = exp(x_ij - lse_i)
//                                              (0 where y_i == ignore_index)
//
// Forward never materialises the [N, V] log-softmax (nor a float32 copy of bf16
// logits): each row is read once and folded into three running numbers, an online
// softmax (Milakov & Gimelshein 2018). Relative to the largest logit m seen so far:
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
// Backward, for upstream gradients g (of logprob) and h (of entropy):
//
//   d logprob_i / d x_ij = [j == y_i] - p_ij
//   d entropy_i / d x_ij = -p_ij (x_ij - lse_i + entropy_i)
//   grad_ij = g_i ([j == y_i] - p_ij) + h_i (-p_ij (x_ij - lse_i + entropy_i))
//
// recomputing p from the saved lse, writing 0 (not 0 * -inf = NaN) where p == 0.
// Ignored rows have neither term: their gradient is 0, written without reading
// the row (prompt tokens, often half the rows in SFT, cost only the write).
// token_logprobs_backward_ writes the gradient over the logits: every element is
// read and then written by the same thread, so the kernel needs nothing else.
//
// Layout: one block of 256 threads per row. The row is split into an unaligned
// head (< 8 elements), a body of 16-byte vectors (8 bf16/fp16 or 4 fp32) read with
// one load each, 4 loads in flight per thread, and a tail (< 8 elements). Row
// starts are not 16-byte aligned in general (bf16 rows of V = 50,257 start every
// 100,514 bytes), so the split is computed per row from the row's address.
// All math is in float32.
//
// Memory traffic (the whole cost: about 10 instructions per element against 2-4
// bytes of memory): forward reads the logits once (2NV bytes for bf16), backward
// reads them again and writes the gradient (4NV). Two separate ops cannot do
// better than 6NV: the backward needs every logit again and the forward cannot
// know g and h. bf16, N = 16,384 at 3.0 TB/s: V = 50,257 -> 0.55 ms forward,
// 1.10 ms backward, 1.65 ms in all; V = 128,256 -> 1.40 + 2.80 = 4.20 ms.
// token_logprobs_fused_ knows g before the forward (a loss linear in the log-probs,
// like SFT's cross-entropy) and writes the gradient in the same kernel, rereading
// each row from shared memory or L2: 4NV, 1.10 ms and 2.80 ms at the same rate.

#include "cuda_common.cuh"

#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

namespace minalign {
namespace {

constexpr int kThreads = 256;  // one block per row
constexpr int kWarps = kThreads / kWarpSize;
constexpr int kUnroll = 4;  // 16-byte loads each thread issues before using the first

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
  if constexpr (kEntropy) s.dot = scale * (s.dot + shift * s.sum);
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

// Merge the statistics of the whole block; the result is valid in thread 0.
template <bool kEntropy>
__device__ SoftmaxStats block_merge(SoftmaxStats s) {
  __shared__ SoftmaxStats per_warp[kWarps];
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    const SoftmaxStats other = {__shfl_xor_sync(kFullWarp, s.max, offset),
                                __shfl_xor_sync(kFullWarp, s.sum, offset),
                                __shfl_xor_sync(kFullWarp, s.dot, offset)};
    s = merge<kEntropy>(s, other);
  }
  if (lane == 0) per_warp[warp] = s;
  __syncthreads();
  if (warp == 0) {
    s = lane < kWarps ? per_warp[lane] : empty_stats();
#pragma unroll
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
      const SoftmaxStats other = {__shfl_xor_sync(kFullWarp, s.max, offset),
                                  __shfl_xor_sync(kFullWarp, s.sum, offset),
                                  __shfl_xor_sync(kFullWarp, s.dot, offset)};
      s = merge<kEntropy>(s, other);
    }
  }
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

// --------------------------------------------------------------------- forward

template <typename scalar_t, bool kEntropy>
__global__ void __launch_bounds__(kThreads)
token_logprobs_kernel(const scalar_t* __restrict__ logits, const int64_t* __restrict__ labels,
                      int64_t V, int64_t ignore_index, float* __restrict__ logprobs,
                      float* __restrict__ lse, float* __restrict__ entropy,
                      unsigned long long* __restrict__ first_bad_row) {
  constexpr int kVec = kVec16<scalar_t>;
  using VecT = Vec<scalar_t, kVec>;
  const int64_t row = blockIdx.x;
  const scalar_t* x = logits + row * V;

  // Thread 0 fetches the label's logit first so that its latency hides behind the
  // row pass. An out-of-range label is never used as an index; it is reported.
  int64_t label = ignore_index;
  float label_logit = NAN;
  if (threadIdx.x == 0) {
    label = labels[row];
    if (label != ignore_index) {
      if (label >= 0 && label < V) {
        label_logit = static_cast<float>(x[label]);
      } else {
        atomicMin(first_bad_row, static_cast<unsigned long long>(row));
      }
    }
  }

  SoftmaxStats s = empty_stats();
  const RowSplit split = split_row<kVec>(x, V);
  if (threadIdx.x == 0) fold_partial<kEntropy, kVec>(s, x, 0, split.head);
  if (threadIdx.x == kThreads - 1) fold_partial<kEntropy, kVec>(s, x, split.tail, V - split.tail);

  const VecT* body = reinterpret_cast<const VecT*>(x + split.head);
  for (int64_t i = threadIdx.x; i < split.num_vecs; i += kThreads * kUnroll) {
    VecT v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (i + u * kThreads < split.num_vecs) v[u] = body[i + u * kThreads];
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (i + u * kThreads < split.num_vecs) {
        float f[kVec];
#pragma unroll
        for (int j = 0; j < kVec; ++j) f[j] = static_cast<float>(v[u].v[j]);
        fold<kEntropy>(s, f);
      }
    }
  }

  s = block_merge<kEntropy>(s);
  if (threadIdx.x == 0) {
    const float log_sum = logf(s.sum);
    lse[row] = s.max + log_sum;
    // Same order as log_softmax: (x - max) - log(sum). NaN for an out-of-range label.
    logprobs[row] = label == ignore_index ? 0.f : (label_logit - s.max) - log_sum;
    if constexpr (kEntropy) entropy[row] = label == ignore_index ? 0.f : log_sum - s.dot / s.sum;
  }
}

// -------------------------------------------------------------------- backward

// The gradient of one logit, given the row's saved statistics.
template <bool kEntropy>
struct RowGrad {
  float lse;
  float g_logprob;
  float g_entropy;
  float ent_shift;    // entropy - lse, so x - lse + entropy == x + ent_shift
  int64_t hot_col;    // the label's column

  __device__ __forceinline__ float operator()(float x, int64_t col) const {
    const float p = exp2f((x - lse) * kLog2e);
    float weight = g_logprob;
    if constexpr (kEntropy) weight += g_entropy * (x + ent_shift);
    float g = (p == 0.f) ? 0.f : -p * weight;
    if (col == hot_col) g += g_logprob;
    return g;
  }
};

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
  VecT* dbody = reinterpret_cast<VecT*>(dx + split.head);
  for (int64_t i = threadIdx.x; i < split.num_vecs; i += kThreads) dbody[i] = zeros;
}

// kVec is 16 bytes' worth when logits and grad_logits rows share their alignment
// (always so in place), else 1 (plain element-wise loads and stores). logits and
// grad_logits are not __restrict__: in place they are the same pointer.
template <typename scalar_t, int kVec, bool kEntropy>
__global__ void __launch_bounds__(kThreads)
token_logprobs_backward_kernel(const float* __restrict__ grad_logprobs,
                               const float* __restrict__ grad_entropy, const scalar_t* logits,
                               const int64_t* __restrict__ labels, const float* __restrict__ lse,
                               const float* __restrict__ entropy, int64_t V, int64_t ignore_index,
                               scalar_t* grad_logits) {
  using VecT = Vec<scalar_t, kVec>;
  const int64_t row = blockIdx.x;
  const scalar_t* x = logits + row * V;
  scalar_t* dx = grad_logits + row * V;

  const RowSplit split = split_row<kVec>(x, V);
  const int64_t label = labels[row];
  if (label == ignore_index) {
    zero_row<kVec>(dx, V, split);
    return;
  }
  RowGrad<kEntropy> grad;
  grad.lse = lse[row];
  grad.g_logprob = grad_logprobs[row];
  grad.g_entropy = kEntropy ? grad_entropy[row] : 0.f;
  grad.ent_shift = kEntropy ? entropy[row] - grad.lse : 0.f;
  grad.hot_col = label;  // an out-of-range label matches no column, and is never an index

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

  const VecT* body = reinterpret_cast<const VecT*>(x + split.head);
  VecT* dbody = reinterpret_cast<VecT*>(dx + split.head);
  for (int64_t i = threadIdx.x; i < split.num_vecs; i += kThreads * kUnroll) {
    VecT v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (i + u * kThreads < split.num_vecs) v[u] = body[i + u * kThreads];
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t k = i + u * kThreads;
      if (k < split.num_vecs) {
        const int64_t col0 = split.head + k * kVec;
        VecT out;
#pragma unroll
        for (int j = 0; j < kVec; ++j) {
          out.v[j] = static_cast<scalar_t>(grad(static_cast<float>(v[u].v[j]), col0 + j));
        }
        dbody[k] = out;
      }
    }
  }
}

// ----------------------------------------------------------------------- fused

constexpr int kFusedUnroll = 8;  // loads in flight per thread: 2 blocks per SM, 16 warps

// The forward and the gradient of sum_r w_r logprob_r in one visit to each row,
// written over the logits: w ([j == y] - p_j) is known as soon as the row's lse is.
// The first `cached_vecs` vectors of the row are kept in shared memory as they are
// read (the whole row when it fits: a bf16 row of V = 50,257 is 100 KB), so the
// second pass rereads them from the chip, not from memory; the rest of the row,
// read last in the first pass, is reread first in the second, while it is most
// likely still in L2. Every element is read and overwritten by the same thread, and
// the overwrites start only after the block has read the whole row.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
token_logprobs_fused_kernel(scalar_t* logits, const int64_t* __restrict__ labels,
                            const float* __restrict__ weights, int64_t V, int64_t ignore_index,
                            int64_t cached_vecs, float* __restrict__ logprobs) {
  constexpr int kVec = kVec16<scalar_t>;
  using VecT = Vec<scalar_t, kVec>;
  extern __shared__ __align__(16) unsigned char cache_bytes[];
  VecT* cache = reinterpret_cast<VecT*>(cache_bytes);
  __shared__ float row_lse;

  const int64_t row = blockIdx.x;
  scalar_t* x = logits + row * V;
  const RowSplit split = split_row<kVec>(x, V);
  const int64_t label = labels[row];  // checked on the host: ignore_index or in [0, V)
  if (label == ignore_index) {  // nothing to learn: the gradient is 0, the row unread
    if (threadIdx.x == 0) logprobs[row] = 0.f;
    zero_row<kVec>(x, V, split);
    return;
  }
  const int64_t cached = cached_vecs < split.num_vecs ? cached_vecs : split.num_vecs;

  // Pass 1: the row's softmax statistics, caching its first `cached` vectors.
  float label_logit = NAN;
  if (threadIdx.x == 0 && label >= 0 && label < V) label_logit = static_cast<float>(x[label]);
  SoftmaxStats s = empty_stats();
  if (threadIdx.x == 0) fold_partial<false, kVec>(s, x, 0, split.head);
  if (threadIdx.x == kThreads - 1) fold_partial<false, kVec>(s, x, split.tail, V - split.tail);
  VecT* body = reinterpret_cast<VecT*>(x + split.head);
  for (int64_t i = threadIdx.x; i < split.num_vecs; i += kThreads * kFusedUnroll) {
    VecT v[kFusedUnroll];
#pragma unroll
    for (int u = 0; u < kFusedUnroll; ++u) {
      if (i + u * kThreads < split.num_vecs) v[u] = body[i + u * kThreads];
    }
#pragma unroll
    for (int u = 0; u < kFusedUnroll; ++u) {
      const int64_t k = i + u * kThreads;
      if (k < split.num_vecs) {
        if (k < cached) cache[k] = v[u];
        float f[kVec];
#pragma unroll
        for (int j = 0; j < kVec; ++j) f[j] = static_cast<float>(v[u].v[j]);
        fold<false>(s, f);
      }
    }
  }
  s = block_merge<false>(s);
  if (threadIdx.x == 0) {
    const float log_sum = logf(s.sum);
    row_lse = s.max + log_sum;
    logprobs[row] = (label_logit - s.max) - log_sum;  // as token_logprobs_kernel
  }
  __syncthreads();  // every read of the row is done; row_lse is set

  // Pass 2: the gradient, over the logits.
  RowGrad<false> grad;
  grad.lse = row_lse;
  grad.g_logprob = weights[row];
  grad.g_entropy = 0.f;
  grad.ent_shift = 0.f;
  grad.hot_col = label;
  if (threadIdx.x == 0) {
    for (int64_t c = 0; c < split.head; ++c) {
      x[c] = static_cast<scalar_t>(grad(static_cast<float>(x[c]), c));
    }
  }
  if (threadIdx.x == kThreads - 1) {
    for (int64_t c = split.tail; c < V; ++c) {
      x[c] = static_cast<scalar_t>(grad(static_cast<float>(x[c]), c));
    }
  }
  auto write_grad = [&](const VecT& v, int64_t k) {
    const int64_t col0 = split.head + k * kVec;
    VecT out;
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      out.v[j] = static_cast<scalar_t>(grad(static_cast<float>(v.v[j]), col0 + j));
    }
    body[k] = out;
  };
  for (int64_t i = cached + threadIdx.x; i < split.num_vecs; i += kThreads * kUnroll) {
    VecT v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (i + u * kThreads < split.num_vecs) v[u] = body[i + u * kThreads];
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (i + u * kThreads < split.num_vecs) write_grad(v[u], i + u * kThreads);
    }
  }
  for (int64_t k = threadIdx.x; k < cached; k += kThreads) write_grad(cache[k], k);
}

// Lowers *first_bad_row to the first row whose label is neither ignore_index nor
// in [0, V).
__global__ void find_bad_label_kernel(const int64_t* __restrict__ labels, int64_t N, int64_t V,
                                      int64_t ignore_index,
                                      unsigned long long* __restrict__ first_bad_row) {
  for (int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; r < N;
       r += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t y = labels[r];
    if (y != ignore_index && (y < 0 || y >= V)) {
      atomicMin(first_bad_row, static_cast<unsigned long long>(r));
    }
  }
}

// ------------------------------------------------------------------------ host

#define MINALIGN_DISPATCH_LOGITS(TYPE, NAME, ...)          \
  AT_DISPATCH_SWITCH(TYPE, NAME,                           \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

// Checks logits [N, V] and labels [N]; returns N and V.
std::pair<int64_t, int64_t> check_logits_and_labels(const char* op, const at::Tensor& logits,
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
void check_first_bad_row(const char* op, const at::Tensor& first_bad_row, const at::Tensor& labels,
                         int64_t V, int64_t ignore_index) {
  const int64_t bad_row = first_bad_row.item<int64_t>();  // waits for the kernel
  TORCH_CHECK(bad_row == labels.size(0), op, ": labels[", bad_row, "] = ",
              labels[bad_row].item<int64_t>(), " is out of range: labels must be in [0, ", V,
              ") or equal ignore_index = ", ignore_index);
}

// An [N] float32 tensor saved or produced by autograd; upstream gradients may be
// expanded views, and making N floats contiguous costs nothing.
at::Tensor row_vector(const char* op, const char* name, const at::Tensor& t,
                      const at::Tensor& logits, int64_t N) {
  at::Tensor c = t.contiguous();
  check_cuda_input(c, op, name, at::kFloat, logits);
  TORCH_CHECK(c.dim() == 1 && c.size(0) == N, op, ": ", name, " must have shape [", N, "], got ",
              c.sizes());
  return c;
}

// inplace_backward only tells autograd which backward to run.
std::tuple<at::Tensor, at::Tensor, at::Tensor> token_logprobs_cuda(const at::Tensor& logits,
                                                                   const at::Tensor& labels,
                                                                   int64_t ignore_index,
                                                                   bool with_entropy,
                                                                   bool /*inplace_backward*/) {
  constexpr const char* op = "minalign.token_logprobs";
  const auto shape = check_logits_and_labels(op, logits, labels);
  const int64_t N = shape.first, V = shape.second;
  const c10::cuda::CUDAGuard guard(logits.device());
  const auto stream = at::cuda::getCurrentCUDAStream();
  const auto f32 = logits.options().dtype(at::kFloat);
  at::Tensor logprobs = at::empty({N}, f32);
  at::Tensor lse = at::empty({N}, f32);
  at::Tensor entropy = with_entropy ? at::empty({N}, f32) : at::empty({0}, f32);
  // The kernel lowers this to the first row whose label is out of range.
  at::Tensor first_bad_row = at::full({1}, N, logits.options().dtype(at::kLong));
  auto* bad_row_ptr = reinterpret_cast<unsigned long long*>(first_bad_row.data_ptr<int64_t>());

  MINALIGN_DISPATCH_LOGITS(logits.scalar_type(), op, [&] {
    const auto* x = logits.data_ptr<scalar_t>();
    const auto* y = labels.data_ptr<int64_t>();
    if (with_entropy) {
      token_logprobs_kernel<scalar_t, true><<<static_cast<unsigned>(N), kThreads, 0, stream>>>(
          x, y, V, ignore_index, logprobs.data_ptr<float>(), lse.data_ptr<float>(),
          entropy.data_ptr<float>(), bad_row_ptr);
    } else {
      token_logprobs_kernel<scalar_t, false><<<static_cast<unsigned>(N), kThreads, 0, stream>>>(
          x, y, V, ignore_index, logprobs.data_ptr<float>(), lse.data_ptr<float>(), nullptr,
          bad_row_ptr);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });

  // Label range. Checking on the host would need the labels there, and a
  // device-side assert would leave the CUDA context unusable for the rest of the
  // process. Instead the kernel never indexes with a bad label and records the
  // first row holding one; reading that record back costs one device-to-host
  // sync per call (microseconds, against a pass over N*V logits), and turns a bad
  // label into an ordinary exception here. Syncing is not allowed while a CUDA
  // graph is being captured: there the check is skipped, and a bad label shows as
  // a NaN log-prob.
  if (c10::cuda::currentStreamCaptureStatusMayInitCtx() == c10::cuda::CaptureStatus::None) {
    check_first_bad_row(op, first_bad_row, labels, V, ignore_index);
  }
  return {logprobs, lse, entropy};
}

// Writes the gradient into grad_logits (a new tensor, or logits itself).
void backward_into(const at::Tensor& grad_logprobs_in,
                   const std::optional<at::Tensor>& grad_entropy_in, const at::Tensor& logits,
                   const at::Tensor& labels, const at::Tensor& lse_in,
                   const std::optional<at::Tensor>& entropy_in, int64_t ignore_index,
                   const at::Tensor& grad_logits) {
  constexpr const char* op = "minalign.token_logprobs_backward";
  const auto shape = check_logits_and_labels(op, logits, labels);
  const int64_t N = shape.first, V = shape.second;
  const at::Tensor grad_logprobs = row_vector(op, "grad_logprobs", grad_logprobs_in, logits, N);
  const at::Tensor lse = row_vector(op, "lse", lse_in, logits, N);
  // No entropy term without grad_entropy (the forward ran without the entropy).
  const bool use_entropy = grad_entropy_in.has_value() && grad_entropy_in->defined();
  at::Tensor grad_entropy, entropy;
  if (use_entropy) {
    TORCH_CHECK(entropy_in.has_value() && entropy_in->defined(), op,
                ": grad_entropy was given without the saved entropy");
    grad_entropy = row_vector(op, "grad_entropy", *grad_entropy_in, logits, N);
    entropy = row_vector(op, "entropy", *entropy_in, logits, N);
  }

  const c10::cuda::CUDAGuard guard(logits.device());
  const auto stream = at::cuda::getCurrentCUDAStream();
  // Rows of logits and grad_logits are split at the same columns only if both
  // tensors start at the same offset from a 16-byte boundary (a fresh tensor
  // starts on one; a view of logits may not; in place they are the same).
  const bool same_alignment = reinterpret_cast<uintptr_t>(logits.data_ptr()) % 16 ==
                              reinterpret_cast<uintptr_t>(grad_logits.data_ptr()) % 16;

  MINALIGN_DISPATCH_LOGITS(logits.scalar_type(), op, [&] {
    const float* g_ent = use_entropy ? grad_entropy.data_ptr<float>() : nullptr;
    const float* ent = use_entropy ? entropy.data_ptr<float>() : nullptr;
    auto launch = [&](auto vec_tag, auto entropy_tag) {
      constexpr int kVec = decltype(vec_tag)::value;
      constexpr bool kEntropy = decltype(entropy_tag)::value;
      const auto grid = static_cast<unsigned>(N);
      token_logprobs_backward_kernel<scalar_t, kVec, kEntropy><<<grid, kThreads, 0, stream>>>(
          grad_logprobs.data_ptr<float>(), g_ent, logits.data_ptr<scalar_t>(),
          labels.data_ptr<int64_t>(), lse.data_ptr<float>(), ent, V, ignore_index,
          grad_logits.data_ptr<scalar_t>());
    };
    using Wide = std::integral_constant<int, kVec16<scalar_t>>;
    using Narrow = std::integral_constant<int, 1>;
    if (same_alignment && use_entropy) {
      launch(Wide{}, std::true_type{});
    } else if (same_alignment) {
      launch(Wide{}, std::false_type{});
    } else if (use_entropy) {
      launch(Narrow{}, std::true_type{});
    } else {
      launch(Narrow{}, std::false_type{});
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor token_logprobs_backward_cuda(const at::Tensor& grad_logprobs,
                                        const std::optional<at::Tensor>& grad_entropy,
                                        const at::Tensor& logits, const at::Tensor& labels,
                                        const at::Tensor& lse,
                                        const std::optional<at::Tensor>& entropy,
                                        int64_t ignore_index) {
  at::Tensor grad_logits = at::empty_like(logits);
  backward_into(grad_logprobs, grad_entropy, logits, labels, lse, entropy, ignore_index,
                grad_logits);
  return grad_logits;
}

// The same gradient, written over the logits.
void token_logprobs_backward_inplace_cuda(const at::Tensor& grad_logprobs,
                                          const std::optional<at::Tensor>& grad_entropy,
                                          at::Tensor& logits, const at::Tensor& labels,
                                          const at::Tensor& lse,
                                          const std::optional<at::Tensor>& entropy,
                                          int64_t ignore_index) {
  backward_into(grad_logprobs, grad_entropy, logits, labels, lse, entropy, ignore_index, logits);
}

// token_logprobs_fused_: labels are checked before the kernel runs, because by the
// time the kernel could report a bad label it has overwritten other rows' logits.
at::Tensor token_logprobs_fused_cuda(at::Tensor& logits, const at::Tensor& labels,
                                     const at::Tensor& weights_in, int64_t ignore_index) {
  constexpr const char* op = "minalign.token_logprobs_fused_";
  const auto shape = check_logits_and_labels(op, logits, labels);
  const int64_t N = shape.first, V = shape.second;
  const at::Tensor weights = row_vector(op, "weights", weights_in, logits, N);
  const c10::cuda::CUDAGuard guard(logits.device());
  const auto stream = at::cuda::getCurrentCUDAStream();

  // As in token_logprobs_cuda, skipped while a CUDA graph is captured (a bad label
  // then gives a NaN log-prob and a gradient without its one-hot term).
  if (c10::cuda::currentStreamCaptureStatusMayInitCtx() == c10::cuda::CaptureStatus::None) {
    at::Tensor first_bad_row = at::full({1}, N, logits.options().dtype(at::kLong));
    const int blocks = static_cast<int>(std::min<int64_t>(ceil_div<int64_t>(N, kThreads), 1024));
    find_bad_label_kernel<<<blocks, kThreads, 0, stream>>>(
        labels.data_ptr<int64_t>(), N, V, ignore_index,
        reinterpret_cast<unsigned long long*>(first_bad_row.data_ptr<int64_t>()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    check_first_bad_row(op, first_bad_row, labels, V, ignore_index);
  }

  at::Tensor logprobs = at::empty({N}, logits.options().dtype(at::kFloat));
  MINALIGN_DISPATCH_LOGITS(logits.scalar_type(), op, [&] {
    constexpr int kVec = kVec16<scalar_t>;
    const auto kernel = token_logprobs_fused_kernel<scalar_t>;
    // Cache as much of the row as lets two blocks share a multiprocessor (half of
    // its shared memory, less what each block needs besides), and no more than
    // the row's whole vectors.
    const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
    const int64_t per_block = static_cast<int64_t>(prop->sharedMemPerMultiprocessor) / 2 -
                              static_cast<int64_t>(prop->reservedSharedMemPerBlock) - 1024;
    const int64_t budget = std::min<int64_t>(per_block, prop->sharedMemPerBlockOptin - 1024);
    const int64_t cached_vecs = std::max<int64_t>(0, std::min<int64_t>(V / kVec, budget / 16));
    const int smem_bytes = static_cast<int>(cached_vecs * 16);
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        smem_bytes));
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                                        cudaSharedmemCarveoutMaxShared));
    kernel<<<static_cast<unsigned>(N), kThreads, smem_bytes, stream>>>(
        logits.data_ptr<scalar_t>(), labels.data_ptr<int64_t>(), weights.data_ptr<float>(), V,
        ignore_index, cached_vecs, logprobs.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return logprobs;
}

}  // namespace
}  // namespace minalign

TORCH_LIBRARY_IMPL(minalign, CUDA, m) {
  m.impl("token_logprobs_fused_", &minalign::token_logprobs_fused_cuda);
  m.impl("token_logprobs", &minalign::token_logprobs_cuda);
  m.impl("token_logprobs_backward", &minalign::token_logprobs_backward_cuda);
  m.impl("token_logprobs_backward_", &minalign::token_logprobs_backward_inplace_cuda);
}
