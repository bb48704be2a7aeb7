// DPO-family pair losses on the GPU: one thread per (chosen, rejected) pair.
//
// With pc, pr the policy log-probs of the chosen and rejected responses and rc, rr
// the reference model's, the margin of implicit rewards (Rafailov et al. 2023) is
//
//   h = (pc - pr) - (rc - rr)
//
// and, with z = beta * h and eps = label_smoothing,
//
//   0 sigmoid (DPO, cDPO):  L = -(1-eps) logsigmoid(z) - eps logsigmoid(-z)
//   1 ipo (Azar et al.):    L = (h - 1/(2 beta))^2
//   2 hinge (SLiC/RSO):     L = relu(1 - z)
//   3 robust (rDPO):        L = (-(1-eps) logsigmoid(z) + eps logsigmoid(-z)) / (1 - 2 eps)
//
// plus the detached rewards beta (pc - rc) and beta (pr - rr).
//
// Backward: L depends on the policy only through h, and dh/dpc = 1, dh/dpr = -1, so
// grad_chosen = g dL/dh and grad_rejected = -g dL/dh, with, using
// d logsigmoid(z)/dz = sigmoid(-z):
//
//   sigmoid: dL/dh = beta (-(1-eps) sigmoid(-z) + eps sigmoid(z))
//   ipo:     dL/dh = 2 (h - 1/(2 beta))
//   hinge:   dL/dh = -beta unless 1 - z <= 0 (relu's subgradient at its kink is 0; a NaN
//            passes it, as in torch.relu's backward)
//   robust:  dL/dh = beta (-(1-eps) sigmoid(-z) - eps sigmoid(z)) / (1 - 2 eps)
//
// Everything is elementwise over [B] float32; B is small (a batch of pairs), so the
// kernels are as plain as they can be. Nothing of size larger than B is created.

#include "cuda_common.cuh"

#include <algorithm>

namespace minalign {
namespace {

enum DpoLossType : int { kSigmoid = 0, kIpo = 1, kHinge = 2, kRobust = 3 };

constexpr int kThreads = 256;

// The scalars every pair needs, converted once on the host the way PyTorch would
// convert Python floats when they meet a float32 tensor.
struct DpoParams {
  float beta;
  float eps;          // label_smoothing
  float keep;         // 1 - eps
  float ipo_target;   // 1 / (2 beta)
  float robust_norm;  // 1 - 2 eps
  int loss_type;
};

// The kernels' parameters for arguments the host has checked.
inline DpoParams dpo_params(double beta, int64_t loss_type, double label_smoothing) {
  DpoParams p;
  p.beta = static_cast<float>(beta);
  p.eps = static_cast<float>(label_smoothing);
  p.keep = static_cast<float>(1.0 - label_smoothing);
  p.ipo_target = static_cast<float>(1.0 / (2.0 * beta));
  p.robust_norm = static_cast<float>(1.0 - 2.0 * label_smoothing);
  p.loss_type = static_cast<int>(loss_type);
  return p;
}

// One thread per pair; the kernels' loops stride over pairs past the last block.
inline int grid_for(int64_t n) {
  constexpr int64_t kMaxBlocks = 65535;
  return static_cast<int>(std::min(ceil_div<int64_t>(n, kThreads), kMaxBlocks));
}

// log(sigmoid(z)) without overflow for large |z|: min(z, 0) - log1p(exp(-|z|)).
__device__ __forceinline__ float log_sigmoid(float z) {
  return fminf(z, 0.f) - log1pf(expf(-fabsf(z)));
}

// sigmoid(z) with exp of a non-positive number only.
__device__ __forceinline__ float sigmoid(float z) {
  const float e = expf(-fabsf(z));  // in (0, 1]
  return z >= 0.f ? 1.f / (1.f + e) : e / (1.f + e);
}

__device__ __forceinline__ float dpo_margin(float pc, float pr, float rc, float rr) {
  return (pc - pr) - (rc - rr);
}

__device__ float dpo_pair_loss(float h, const DpoParams& p) {
  const float z = p.beta * h;
  switch (p.loss_type) {
    case kSigmoid:
      return -p.keep * log_sigmoid(z) - p.eps * log_sigmoid(-z);
    case kIpo: {
      const float d = h - p.ipo_target;
      return d * d;
    }
    case kHinge:
      return 1.f - z <= 0.f ? 0.f : 1.f - z;  // NaN stays NaN, as in torch.relu
    default:  // kRobust
      return (-p.keep * log_sigmoid(z) + p.eps * log_sigmoid(-z)) / p.robust_norm;
  }
}

__device__ float dpo_pair_dloss_dh(float h, const DpoParams& p) {
  const float z = p.beta * h;
  switch (p.loss_type) {
    case kSigmoid:
      return p.beta * (-p.keep * sigmoid(-z) + p.eps * sigmoid(z));
    case kIpo:
      return 2.f * (h - p.ipo_target);
    case kHinge:
      return 1.f - z <= 0.f ? 0.f : -p.beta;
    default:  // kRobust
      return p.beta * (-p.keep * sigmoid(-z) - p.eps * sigmoid(z)) / p.robust_norm;
  }
}

__global__ void dpo_loss_kernel(const float* __restrict__ pc, const float* __restrict__ pr,
                                const float* __restrict__ rc, const float* __restrict__ rr,
                                DpoParams params, int64_t n, float* __restrict__ losses,
                                float* __restrict__ chosen_rewards,
                                float* __restrict__ rejected_rewards) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const float h = dpo_margin(pc[i], pr[i], rc[i], rr[i]);
    losses[i] = dpo_pair_loss(h, params);
    chosen_rewards[i] = params.beta * (pc[i] - rc[i]);
    rejected_rewards[i] = params.beta * (pr[i] - rr[i]);
  }
}

__global__ void dpo_loss_backward_kernel(const float* __restrict__ grad_losses,
                                         const float* __restrict__ pc,
                                         const float* __restrict__ pr,
                                         const float* __restrict__ rc,
                                         const float* __restrict__ rr, DpoParams params,
                                         int64_t n, float* __restrict__ grad_chosen,
                                         float* __restrict__ grad_rejected) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const float h = dpo_margin(pc[i], pr[i], rc[i], rr[i]);
    const float g = grad_losses[i] * dpo_pair_dloss_dh(h, params);
    grad_chosen[i] = g;
    grad_rejected[i] = -g;
  }
}

}  // namespace
}  // namespace minalign

// ------------------------------------------------------------------------ host
#ifndef MINALIGN_CUDA_ON_CPU  // see cuda_common.cuh

#include <torch/library.h>

namespace minalign {
namespace {

DpoParams make_params(const char* op, double beta, int64_t loss_type, double label_smoothing) {
  TORCH_CHECK(loss_type >= kSigmoid && loss_type <= kRobust, op,
              ": loss_type must be 0 (sigmoid), 1 (ipo), 2 (hinge) or 3 (robust), got ",
              loss_type);
  TORCH_CHECK(beta > 0, op, ": beta must be > 0, got ", beta);
  TORCH_CHECK(0 <= label_smoothing && label_smoothing < 0.5, op,
              ": label_smoothing must be in [0, 0.5), got ", label_smoothing);
  return dpo_params(beta, loss_type, label_smoothing);
}

void check_logps(const char* op, const at::Tensor& pc, const at::Tensor& pr,
                 const at::Tensor& rc, const at::Tensor& rr) {
  TORCH_CHECK(pc.dim() == 1, op, ": policy_chosen_logps must be 1-D [B], got shape ",
              pc.sizes());
  TORCH_CHECK(pc.numel() > 0, op, ": empty batch (policy_chosen_logps has shape ", pc.sizes(), ")");
  check_cuda_input(pc, op, "policy_chosen_logps", at::kFloat, pc);
  check_cuda_input(pr, op, "policy_rejected_logps", at::kFloat, pc);
  check_cuda_input(rc, op, "ref_chosen_logps", at::kFloat, pc);
  check_cuda_input(rr, op, "ref_rejected_logps", at::kFloat, pc);
  check_same_shape(pr, pc, op, "policy_rejected_logps", "policy_chosen_logps");
  check_same_shape(rc, pc, op, "ref_chosen_logps", "policy_chosen_logps");
  check_same_shape(rr, pc, op, "ref_rejected_logps", "policy_chosen_logps");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dpo_loss_cuda(
    const at::Tensor& pc, const at::Tensor& pr, const at::Tensor& rc, const at::Tensor& rr,
    double beta, int64_t loss_type, double label_smoothing) {
  constexpr const char* op = "minalign.dpo_loss";
  check_logps(op, pc, pr, rc, rr);
  const DpoParams params = make_params(op, beta, loss_type, label_smoothing);
  const c10::cuda::CUDAGuard guard(pc.device());
  at::Tensor losses = at::empty_like(pc);
  at::Tensor chosen_rewards = at::empty_like(pc);
  at::Tensor rejected_rewards = at::empty_like(pc);
  const int64_t n = pc.numel();
  if (n > 0) {
    dpo_loss_kernel<<<grid_for(n), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        pc.data_ptr<float>(), pr.data_ptr<float>(), rc.data_ptr<float>(), rr.data_ptr<float>(),
        params, n, losses.data_ptr<float>(), chosen_rewards.data_ptr<float>(),
        rejected_rewards.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {losses, chosen_rewards, rejected_rewards};
}

std::tuple<at::Tensor, at::Tensor> dpo_loss_backward_cuda(
    const at::Tensor& grad_losses_in, const at::Tensor& pc, const at::Tensor& pr,
    const at::Tensor& rc, const at::Tensor& rr, double beta, int64_t loss_type,
    double label_smoothing) {
  constexpr const char* op = "minalign.dpo_loss_backward";
  check_logps(op, pc, pr, rc, rr);
  // Upstream gradients are often expanded views (the backward of a mean); copying
  // B floats to make them contiguous costs nothing.
  const at::Tensor grad_losses = grad_losses_in.contiguous();
  check_cuda_input(grad_losses, op, "grad_losses", at::kFloat, pc);
  check_same_shape(grad_losses, pc, op, "grad_losses", "policy_chosen_logps");
  const DpoParams params = make_params(op, beta, loss_type, label_smoothing);
  const c10::cuda::CUDAGuard guard(pc.device());
  at::Tensor grad_chosen = at::empty_like(pc);
  at::Tensor grad_rejected = at::empty_like(pc);
  const int64_t n = pc.numel();
  if (n > 0) {
    dpo_loss_backward_kernel<<<grid_for(n), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        grad_losses.data_ptr<float>(), pc.data_ptr<float>(), pr.data_ptr<float>(),
        rc.data_ptr<float>(), rr.data_ptr<float>(), params, n, grad_chosen.data_ptr<float>(),
        grad_rejected.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {grad_chosen, grad_rejected};
}

}  // namespace
}  // namespace minalign

TORCH_LIBRARY_IMPL(minalign, CUDA, m) {
  m.impl("dpo_loss", &minalign::dpo_loss_cuda);
  m.impl("dpo_loss_backward", &minalign::dpo_loss_backward_cuda);
}

#endif  // MINALIGN_CUDA_ON_CPU
