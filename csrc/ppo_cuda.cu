// PPO's clipped surrogate (Schulman et al. 2017) and clipped value loss (OpenAI's
// implementations; minalign/reference.py) on the GPU, as masked means over the [B, T]
// response tokens.
//
// Policy, with r = exp(logp - old_logp), advantages A and clip eps:
//
//   pg1 = -A r,   pg2 = -A clamp(r, 1 - eps, 1 + eps)
//   loss      = sum(m max(pg1, pg2)) / max(sum m, 1)
//   clipfrac  = sum(m [pg2 > pg1]) / max(sum m, 1)
//   approx_kl = sum(m 0.5 (logp - old_logp)^2) / max(sum m, 1)
//
//   d loss / d logp_i = g m_i / max(sum m, 1) (w1 (-A r) + w2 (-A r [1-eps < r < 1+eps]))
//
// Value, with values v, old values o, returns R and clip c:
//
//   v_clip = o + clamp(v - o, -c, c)
//   loss     = 0.5 sum(m max((v - R)^2, (v_clip - R)^2)) / max(sum m, 1)
//   clipfrac = sum(m [(v_clip - R)^2 > (v - R)^2]) / max(sum m, 1)
//
//   d loss / d v_i = g 0.5 m_i / max(sum m, 1) (w1 2 (v - R) + w2 2 (v_clip - R) [-c < v - o < c])
//
// The weights w1, w2 are torch.maximum's backward: the whole gradient to the
// larger argument, half to each on a tie; and the clamp passes a gradient only
// strictly inside its interval: at the ends its slope is taken as 0, the
// minimum-norm subgradient (minalign.reference.clamp). So the gradients match
// autograd of the PyTorch reference, not just almost everywhere.
//
// The sums are sum_cuda.cuh's, bit-identical from run to run. Nothing of size
// [B, T] is created in the forward; the backward writes only the gradient.

#include "cuda_common.cuh"
#include "sum_cuda.cuh"

#include <algorithm>

namespace minalign {
namespace {

constexpr int kThreads = kSumThreads;

// ---------------------------------------------------------- torch-exact pieces

// torch.maximum: NaN if either argument is NaN (fmaxf would drop it).
__device__ __forceinline__ float torch_maximum(float a, float b) {
  return (a != a || b != b) ? a + b : fmaxf(a, b);
}

// torch.clamp: NaN stays NaN.
__device__ __forceinline__ float torch_clamp(float x, float lo, float hi) {
  return x != x ? x : fminf(fmaxf(x, lo), hi);
}

// Weights of torch.maximum(a, b)'s backward for a and for b: 1 to the larger,
// 0.5 each on a tie (with a NaN, neither comparison holds and both get 1).
struct MaxWeights {
  float a, b;
};
__device__ __forceinline__ MaxWeights maximum_weights(float a, float b) {
  if (a == b) return {0.5f, 0.5f};
  return {a < b ? 0.f : 1.f, b < a ? 0.f : 1.f};
}

// ------------------------------------------------------------ per-token terms

struct PolicyTerm {
  float loss;     // max(pg1, pg2)
  float clipped;  // [pg2 > pg1]
  float kl;       // 0.5 (logp - old)^2
  float dloss;    // d max(pg1, pg2) / d logp
};

__device__ __forceinline__ PolicyTerm policy_term(float logp, float old, float adv, float lo,
                                                  float hi) {
  const float log_ratio = logp - old;
  const float ratio = expf(log_ratio);
  const float pg1 = -adv * ratio;
  const float pg2 = -adv * torch_clamp(ratio, lo, hi);
  const MaxWeights w = maximum_weights(pg1, pg2);
  const bool inside = lo < ratio && ratio < hi;  // where clamp passes the gradient
  PolicyTerm t;
  t.loss = torch_maximum(pg1, pg2);
  t.clipped = pg2 > pg1 ? 1.f : 0.f;
  t.kl = 0.5f * log_ratio * log_ratio;
  t.dloss = w.a * (-adv * ratio) + (inside ? w.b * (-adv * ratio) : 0.f);
  return t;
}

struct ValueTerm {
  float loss;     // max((v - R)^2, (v_clip - R)^2), before the 0.5
  float clipped;  // [(v_clip - R)^2 > (v - R)^2]
  float dloss;    // d loss / d v
};

__device__ __forceinline__ ValueTerm value_term(float v, float old, float ret, float clip) {
  const float diff = v - old;
  const float v_clip = old + torch_clamp(diff, -clip, clip);
  const float err = v - ret;
  const float err_clip = v_clip - ret;
  const float sq = err * err;
  const float sq_clip = err_clip * err_clip;
  const MaxWeights w = maximum_weights(sq, sq_clip);
  const bool inside = -clip < diff && diff < clip;
  ValueTerm t;
  t.loss = torch_maximum(sq, sq_clip);
  t.clipped = sq_clip > sq ? 1.f : 0.f;
  t.dloss = w.a * 2.f * err + (inside ? w.b * 2.f * err_clip : 0.f);
  return t;
}

// The summands of each op, one functor per reduction: operator()(i, out) writes
// the K numbers element i adds to the K sums.
struct PolicySummands {
  static constexpr int K = 4;  // masked loss, mask, masked clipped, masked kl
  const float *logp, *old, *adv, *mask;
  float lo, hi;
  __device__ void operator()(int64_t i, float (&out)[K]) const {
    const float m = mask[i];
    const PolicyTerm t = policy_term(logp[i], old[i], adv[i], lo, hi);
    out[0] = m * t.loss;
    out[1] = m;
    out[2] = m * t.clipped;
    out[3] = m * t.kl;
  }
};

struct ValueSummands {
  static constexpr int K = 3;  // masked loss, mask, masked clipped
  const float *v, *old, *ret, *mask;
  float clip;
  __device__ void operator()(int64_t i, float (&out)[K]) const {
    const float m = mask[i];
    const ValueTerm t = value_term(v[i], old[i], ret[i], clip);
    out[0] = m * t.loss;
    out[1] = m;
    out[2] = m * t.clipped;
  }
};

struct MaskSummands {
  static constexpr int K = 1;
  const float* mask;
  __device__ void operator()(int64_t i, float (&out)[K]) const { out[0] = mask[i]; }
};

// The divisor of every masked mean.
__device__ __forceinline__ float mask_count(float mask_sum) { return fmaxf(mask_sum, 1.f); }

struct PolicyFinish {
  float *loss, *clipfrac, *approx_kl;
  __device__ void operator()(const float (&t)[PolicySummands::K]) const {
    const float count = mask_count(t[1]);
    *loss = t[0] / count;
    *clipfrac = t[2] / count;
    *approx_kl = t[3] / count;
  }
};

struct ValueFinish {
  float *loss, *clipfrac;
  __device__ void operator()(const float (&t)[ValueSummands::K]) const {
    const float count = mask_count(t[1]);
    *loss = 0.5f * (t[0] / count);
    *clipfrac = t[2] / count;
  }
};

// For the backward: scale = grad_loss / max(sum m, 1), the factor every
// token's gradient shares.
struct GradScaleFinish {
  const float* grad_loss;
  float* scale;
  __device__ void operator()(const float (&t)[MaskSummands::K]) const {
    *scale = *grad_loss / mask_count(t[0]);
  }
};

// ---------------------------------------------------------------- backward maps

__global__ void ppo_policy_loss_backward_kernel(const float* __restrict__ scale,
                                                const float* __restrict__ logp,
                                                const float* __restrict__ old,
                                                const float* __restrict__ adv,
                                                const float* __restrict__ mask, float lo, float hi,
                                                int64_t n, float* __restrict__ grad) {
  const float s = *scale;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    grad[i] = s * mask[i] * policy_term(logp[i], old[i], adv[i], lo, hi).dloss;
  }
}

__global__ void ppo_value_loss_backward_kernel(const float* __restrict__ scale,
                                               const float* __restrict__ v,
                                               const float* __restrict__ old,
                                               const float* __restrict__ ret,
                                               const float* __restrict__ mask, float clip,
                                               int64_t n, float* __restrict__ grad) {
  const float s = 0.5f * *scale;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    grad[i] = s * mask[i] * value_term(v[i], old[i], ret[i], clip).dloss;
  }
}

// One thread per token; the loops stride over tokens past the last block.
inline int elementwise_grid(int64_t n) {
  constexpr int64_t kMaxBlocks = 4096;
  return static_cast<int>(std::clamp<int64_t>(ceil_div<int64_t>(n, kThreads), 1, kMaxBlocks));
}

}  // namespace
}  // namespace minalign

// ------------------------------------------------------------------------ host
#ifndef MINALIGN_CUDA_ON_CPU  // see cuda_common.cuh

#include <torch/library.h>

namespace minalign {
namespace {

void check_four(const char* op, const at::Tensor& first, const char* first_name,
                const at::Tensor& b, const char* b_name, const at::Tensor& c, const char* c_name,
                const at::Tensor& mask) {
  check_cuda_input(first, op, first_name, at::kFloat, first);
  TORCH_CHECK(first.dim() == 2, op, ": ", first_name, " must be 2-D [B, T], got shape ",
              first.sizes());
  TORCH_CHECK(first.numel() > 0, op, ": empty batch (", first_name, " has shape ", first.sizes(),
              ")");
  check_cuda_input(b, op, b_name, at::kFloat, first);
  check_cuda_input(c, op, c_name, at::kFloat, first);
  check_cuda_input(mask, op, "mask", at::kFloat, first);
  check_same_shape(b, first, op, b_name, first_name);
  check_same_shape(c, first, op, c_name, first_name);
  check_same_shape(mask, first, op, "mask", first_name);
}

// grad_loss is the gradient of a 0-dim loss: one float32 on the inputs' device.
void check_grad_loss(const char* op, const at::Tensor& grad_loss, const at::Tensor& like) {
  check_cuda_input(grad_loss, op, "grad_loss", at::kFloat, like);
  TORCH_CHECK(grad_loss.numel() == 1, op,
              ": grad_loss must hold one value (the loss is 0-dim), got shape ", grad_loss.sizes());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ppo_policy_loss_cuda(
    const at::Tensor& logprobs, const at::Tensor& old_logprobs, const at::Tensor& advantages,
    const at::Tensor& mask, double clip_eps) {
  constexpr const char* op = "minalign.ppo_policy_loss";
  check_four(op, logprobs, "logprobs", old_logprobs, "old_logprobs", advantages, "advantages",
             mask);
  TORCH_CHECK(clip_eps >= 0, op, ": clip_eps must be >= 0, got ", clip_eps);
  const c10::cuda::CUDAGuard guard(logprobs.device());
  const auto f32 = logprobs.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({}, f32), clipfrac = at::empty({}, f32), approx_kl = at::empty({}, f32);
  const PolicySummands summands{logprobs.data_ptr<float>(), old_logprobs.data_ptr<float>(),
                                advantages.data_ptr<float>(), mask.data_ptr<float>(),
                                static_cast<float>(1.0 - clip_eps), static_cast<float>(1.0 + clip_eps)};
  const PolicyFinish finish{loss.data_ptr<float>(), clipfrac.data_ptr<float>(),
                            approx_kl.data_ptr<float>()};
  reduce(summands, logprobs.numel(), finish, logprobs);
  return {loss, clipfrac, approx_kl};
}

at::Tensor ppo_policy_loss_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& logprobs,
                                         const at::Tensor& old_logprobs,
                                         const at::Tensor& advantages, const at::Tensor& mask,
                                         double clip_eps) {
  constexpr const char* op = "minalign.ppo_policy_loss_backward";
  check_four(op, logprobs, "logprobs", old_logprobs, "old_logprobs", advantages, "advantages",
             mask);
  TORCH_CHECK(clip_eps >= 0, op, ": clip_eps must be >= 0, got ", clip_eps);
  check_grad_loss(op, grad_loss, logprobs);
  const c10::cuda::CUDAGuard guard(logprobs.device());
  const int64_t n = logprobs.numel();
  at::Tensor scale = at::empty({1}, logprobs.options().dtype(at::kFloat));
  reduce(MaskSummands{mask.data_ptr<float>()}, n,
         GradScaleFinish{grad_loss.data_ptr<float>(), scale.data_ptr<float>()}, logprobs);
  at::Tensor grad = at::empty_like(logprobs);
  if (n > 0) {
    ppo_policy_loss_backward_kernel<<<elementwise_grid(n), kThreads, 0,
                                      at::cuda::getCurrentCUDAStream()>>>(
        scale.data_ptr<float>(), logprobs.data_ptr<float>(), old_logprobs.data_ptr<float>(),
        advantages.data_ptr<float>(), mask.data_ptr<float>(), static_cast<float>(1.0 - clip_eps),
        static_cast<float>(1.0 + clip_eps), n, grad.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return grad;
}

std::tuple<at::Tensor, at::Tensor> ppo_value_loss_cuda(const at::Tensor& values,
                                                       const at::Tensor& old_values,
                                                       const at::Tensor& returns,
                                                       const at::Tensor& mask, double clip) {
  constexpr const char* op = "minalign.ppo_value_loss";
  check_four(op, values, "values", old_values, "old_values", returns, "returns", mask);
  TORCH_CHECK(clip >= 0, op, ": clip must be >= 0, got ", clip);
  const c10::cuda::CUDAGuard guard(values.device());
  const auto f32 = values.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({}, f32), clipfrac = at::empty({}, f32);
  const ValueSummands summands{values.data_ptr<float>(), old_values.data_ptr<float>(),
                               returns.data_ptr<float>(), mask.data_ptr<float>(),
                               static_cast<float>(clip)};
  reduce(summands, values.numel(), ValueFinish{loss.data_ptr<float>(), clipfrac.data_ptr<float>()},
         values);
  return {loss, clipfrac};
}

at::Tensor ppo_value_loss_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& values,
                                        const at::Tensor& old_values, const at::Tensor& returns,
                                        const at::Tensor& mask, double clip) {
  constexpr const char* op = "minalign.ppo_value_loss_backward";
  check_four(op, values, "values", old_values, "old_values", returns, "returns", mask);
  TORCH_CHECK(clip >= 0, op, ": clip must be >= 0, got ", clip);
  check_grad_loss(op, grad_loss, values);
  const c10::cuda::CUDAGuard guard(values.device());
  const int64_t n = values.numel();
  at::Tensor scale = at::empty({1}, values.options().dtype(at::kFloat));
  reduce(MaskSummands{mask.data_ptr<float>()}, n,
         GradScaleFinish{grad_loss.data_ptr<float>(), scale.data_ptr<float>()}, values);
  at::Tensor grad = at::empty_like(values);
  if (n > 0) {
    ppo_value_loss_backward_kernel<<<elementwise_grid(n), kThreads, 0,
                                     at::cuda::getCurrentCUDAStream()>>>(
        scale.data_ptr<float>(), values.data_ptr<float>(), old_values.data_ptr<float>(),
        returns.data_ptr<float>(), mask.data_ptr<float>(), static_cast<float>(clip), n,
        grad.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return grad;
}

}  // namespace
}  // namespace minalign

TORCH_LIBRARY_IMPL(minalign, CUDA, m) {
  m.impl("ppo_policy_loss", &minalign::ppo_policy_loss_cuda);
  m.impl("ppo_policy_loss_backward", &minalign::ppo_policy_loss_backward_cuda);
  m.impl("ppo_value_loss", &minalign::ppo_value_loss_cuda);
  m.impl("ppo_value_loss_backward", &minalign::ppo_value_loss_backward_cuda);
}

#endif  // MINALIGN_CUDA_ON_CPU
