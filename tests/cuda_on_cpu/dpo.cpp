// minalign's CUDA DPO kernels (csrc/dpo_cuda.cu) built for the CPU with emulation.h,
// behind a C interface for tests/test_cuda_kernels_on_cpu.py, launched as the host
// functions in csrc/ launch them.

#include "emulation.h"

#include "dpo_cuda.cu"

using minalign::kThreads;

extern "C" {

void dpo_loss(const float* pc, const float* pr, const float* rc, const float* rr, int64_t n,
              double beta, int64_t loss_type, double label_smoothing, float* losses,
              float* chosen_rewards, float* rejected_rewards) {
  const minalign::DpoParams params = minalign::dpo_params(beta, loss_type, label_smoothing);
  emulation::launch(minalign::grid_for(n), kThreads, 0, [&] {
    minalign::dpo_loss_kernel(pc, pr, rc, rr, params, n, losses, chosen_rewards,
                              rejected_rewards);
  });
}

void dpo_loss_backward(const float* grad_losses, const float* pc, const float* pr,
                       const float* rc, const float* rr, int64_t n, double beta,
                       int64_t loss_type, double label_smoothing, float* grad_chosen,
                       float* grad_rejected) {
  const minalign::DpoParams params = minalign::dpo_params(beta, loss_type, label_smoothing);
  emulation::launch(minalign::grid_for(n), kThreads, 0, [&] {
    minalign::dpo_loss_backward_kernel(grad_losses, pc, pr, rc, rr, params, n, grad_chosen,
                                       grad_rejected);
  });
}

}  // extern "C"
