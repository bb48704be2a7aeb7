// Per-token log-probabilities, log-sum-exp and entropy of a row of logits, on the
// GPU, and their gradient.
//
// For each row i of logits x [N, V] and its label y_i:
//
//   lse_i      = log sum_j exp(x_ij)
//   logprob_i  = x_iy - lse_i                  (0 where y_i == ignore_index)
//   entropy_i  = -sum_j p_ij log p_ij = lse_i - sum_j p_ij x_ij,   p_ij = exp(x_ij - lse_i)
//                                              (0 where y_i == ignore_index)
//
// Forward never materialises the [N, V] log-softmax (nor a float32 copy of bf16
// logits): each row is read once and folded into an online softmax (the math is
// at the top of softmax_cuda.cuh), leaving lse, the log-prob and the entropy.
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
// Memory traffic (the whole cost: about 10 instructions per element against 2-4
// bytes of memory): forward reads the logits once (2NV bytes for bf16), backward
// reads them again and writes the gradient (4NV). Two separate ops cannot do
// better than 6NV: the backward needs every logit again and the forward cannot
// know g and h. bf16, N = 16,384 at 3.0 TB/s: V = 50,257 -> 0.55 ms forward,
// 1.10 ms backward, 1.65 ms in all; V = 128,256 -> 1.40 + 2.80 = 4.20 ms.
// A loss whose g is known before the forward can do with 4NV: logprobs_fused_cuda.cu.

#include "softmax_cuda.cuh"

namespace minalign {
namespace {

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

  const VecT* body = as_vectors<const VecT>(x + split.head, split.num_vecs);
  for_each_vector(body, 0, split.num_vecs,
                           [&](const VecT& v, int64_t) { fold_vector<kEntropy>(s, v); });

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

  write_edge_grads(grad, x, dx, V, split);
  const VecT* body = as_vectors<const VecT>(x + split.head, split.num_vecs);
  VecT* dbody = as_vectors<VecT>(dx + split.head, split.num_vecs);
  for_each_vector(body, 0, split.num_vecs, [&](const VecT& v, int64_t k) {
    dbody[k] = grad(v, split.head + k * kVec);
  });
}

}  // namespace
}  // namespace minalign

// ------------------------------------------------------------------------ host
#ifndef MINALIGN_CUDA_ON_CPU  // see cuda_common.cuh

#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <torch/library.h>

namespace minalign {
namespace {

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

}  // namespace
}  // namespace minalign

TORCH_LIBRARY_IMPL(minalign, CUDA, m) {
  m.impl("token_logprobs", &minalign::token_logprobs_cuda);
  m.impl("token_logprobs_backward", &minalign::token_logprobs_backward_cuda);
  m.impl("token_logprobs_backward_", &minalign::token_logprobs_backward_inplace_cuda);
}

#endif  // MINALIGN_CUDA_ON_CPU
