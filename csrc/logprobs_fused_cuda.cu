// A weighted sum of log-probabilities and its gradient in one kernel, on the GPU
// (token_logprobs_fused_): the loss sum_i w_i logprob_i of SFT's cross-entropy,
// whose weights w are known before the forward.
//
// For each row i of logits x [N, V] and its label y_i (a row whose label is
// ignore_index has log-prob 0 and gradient 0, and is not read):
//
//   logprob_i = x_iy - lse_i,   d (sum_r w_r logprob_r) / d x_ij = w_i ([j == y_i] - p_ij)
//
// The gradient is known as soon as the row's lse is, so one kernel reads the row,
// folds it into an online softmax (softmax_cuda.cuh) and then writes the gradient
// over the logits. Nothing of size [N, V] is allocated, not even the gradient, and
// no lse is saved for a backward. The arithmetic is that of token_logprobs_kernel
// followed by token_logprobs_backward_kernel (logprobs_cuda.cu), in the same
// order, so the results are the same bit for bit (a test holds them to it).
//
// Memory traffic: one read and one write of the logits, 4NV bytes for bf16 against
// 6NV for a forward and a backward: bf16, N = 16,384 at 3.0 TB/s, 1.10 ms at
// V = 50,257 and 2.80 ms at V = 128,256. The second visit to a row must not go to
// memory: each block keeps the first part of its row in shared memory as it reads
// it (all of a bf16 row of V = 50,257), and rereads the rest from L2 right away.
// That holds while the uncached parts of the rows in flight fit in L2: on an H100
// (50 MB of L2, 2 blocks on each of 132 multiprocessors) up to about V = 130,000 in
// bf16; past that, some of the second pass comes from memory again.

#include "softmax_cuda.cuh"

namespace minalign {
namespace {

constexpr int kFusedLoadsInFlight = 8;  // loads in flight per thread: 2 blocks per SM, 16 warps

// The forward and the gradient of sum_r w_r logprob_r in one visit to each row,
// written over the logits: w ([j == y] - p_j) is known as soon as the row's lse is.
// The first `cached_vecs` vectors of the row are kept in shared memory as they are
// read (the whole row when it fits: a bf16 row of V = 50,257 is 100 KB), so the
// second pass rereads them from the chip, not from memory; the rest of the row,
// read last in the first pass, is reread first in the second, while it is most
// likely still in L2. The __syncthreads between the passes is what makes the
// overwrites safe: a vector may be read by one thread and overwritten by another
// (the uncached part, when the cache is not a whole number of rounds; the label's
// logit), but only after the whole block has read the whole row. Two blocks share a
// multiprocessor (their shared memory is sized for it; the launch bounds keep the
// registers under 128 per thread for it).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads, 2)
token_logprobs_fused_kernel(scalar_t* logits, const int64_t* __restrict__ labels,
                            const float* __restrict__ weights, int64_t V, int64_t ignore_index,
                            int64_t cached_vecs, float* __restrict__ logprobs) {
  constexpr int kVec = kVec16<scalar_t>;
  using VecT = Vec<scalar_t, kVec>;
  VecT* cache = dynamic_shared_memory<VecT>();
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
  VecT* body = as_vectors<VecT>(x + split.head, split.num_vecs);
  for_each_vector<kFusedLoadsInFlight>(body, 0, split.num_vecs, [&](const VecT& v, int64_t k) {
    if (k < cached) cache[k] = v;
    fold_vector<false>(s, v);
  });
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
  write_edge_grads(grad, x, x, V, split);
  auto write_grad = [&](const VecT& v, int64_t k) { body[k] = grad(v, split.head + k * kVec); };
  for_each_vector(body, cached, split.num_vecs, write_grad);  // from L2
  for (int64_t k = threadIdx.x; k < cached; k += kThreads) {
    const VecT v = cache[k];  // one 16-byte shared load (a reference would load each element)
    write_grad(v, k);
  }
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

}  // namespace
}  // namespace minalign

// ------------------------------------------------------------------------ host
#ifndef MINALIGN_CUDA_ON_CPU  // see cuda_common.cuh

#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>

namespace minalign {
namespace {

// Bytes of each row to keep in shared memory: by default as much as lets two blocks
// share a multiprocessor (half of its shared memory, less what each block needs
// besides). MINALIGN_FUSED_CACHE_KB overrides that, up to what one block may have: a
// knob for bench/bench_logprobs.py (0 rereads each row from L2; more than the default
// leaves one block per multiprocessor, with more of a long row cached).
// The most dynamic shared memory one block of the kernel may have: all a block may opt
// in to, less 1 KB for its static shared memory.
int64_t fused_smem_limit() {
  return static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin) - 1024;
}

int64_t fused_cache_bytes(const char* op) {
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  const int64_t most = fused_smem_limit();
  const int64_t two_per_sm = static_cast<int64_t>(prop->sharedMemPerMultiprocessor) / 2 -
                             static_cast<int64_t>(prop->reservedSharedMemPerBlock) - 1024;
  const char* knob = std::getenv("MINALIGN_FUSED_CACHE_KB");
  if (knob == nullptr || *knob == '\0') return std::min(two_per_sm, most);
  char* end = nullptr;
  const long long kb = std::strtoll(knob, &end, 10);
  TORCH_CHECK(*end == '\0' && kb >= 0, op,
              ": MINALIGN_FUSED_CACHE_KB must be a whole number of KB, 0 or more, got '", knob,
              "'");
  return std::min<int64_t>(kb, most / 1024) * 1024;
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
  const int64_t cache_bytes = std::max<int64_t>(0, fused_cache_bytes(op));
  MINALIGN_DISPATCH_LOGITS(logits.scalar_type(), op, [&] {
    constexpr int kVec = kVec16<scalar_t>;
    const auto kernel = token_logprobs_fused_kernel<scalar_t>;
    const int64_t cached_vecs = std::min<int64_t>(V / kVec, cache_bytes / 16);  // whole vectors
    const int smem_bytes = static_cast<int>(cached_vecs * 16);
    // The limit, not this launch's size: the same value from every call and thread, so
    // that another thread's call between this one's set and launch cannot lower it.
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(fused_smem_limit())));
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
}

#endif  // MINALIGN_CUDA_ON_CPU
