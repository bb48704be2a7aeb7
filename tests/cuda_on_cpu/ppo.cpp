// minalign's CUDA PPO kernels (csrc/ppo_cuda.cu) built for the CPU with emulation.h,
// behind a C interface for tests/test_cuda_kernels_on_cpu.py, launched as the host
// functions in csrc/ launch them.

#include "emulation.h"

#include "ppo_cuda.cu"

namespace {

using namespace minalign;

// The two stages of reduce() in csrc/sum_cuda.cuh.
template <typename Summands, typename Finish>
void reduce(const Summands& summands, int64_t n, const Finish& finish) {
  const int blocks = reduce_blocks(n);
  std::vector<float> partials(Summands::K * blocks);
  emulation::launch(blocks, kThreads, 0,
                    [&] { partial_sums_kernel(summands, n, partials.data()); });
  emulation::launch(1, kThreads, 0, [&] {
    finish_sums_kernel<Summands::K>(partials.data(), blocks, finish);
  });
}

}  // namespace

extern "C" {

void ppo_policy_loss(const float* logp, const float* old, const float* adv, const float* mask,
                     int64_t n, double clip_eps, float* loss, float* clipfrac, float* approx_kl) {
  const auto lo = static_cast<float>(1.0 - clip_eps), hi = static_cast<float>(1.0 + clip_eps);
  reduce(PolicySummands{logp, old, adv, mask, lo, hi}, n, PolicyFinish{loss, clipfrac, approx_kl});
}

void ppo_policy_loss_backward(const float* grad_loss, const float* logp, const float* old,
                              const float* adv, const float* mask, int64_t n, double clip_eps,
                              float* grad) {
  const auto lo = static_cast<float>(1.0 - clip_eps), hi = static_cast<float>(1.0 + clip_eps);
  float scale = 0.f;
  reduce(MaskSummands{mask}, n, GradScaleFinish{grad_loss, &scale});
  emulation::launch(elementwise_grid(n), kThreads, 0, [&] {
    ppo_policy_loss_backward_kernel(&scale, logp, old, adv, mask, lo, hi, n, grad);
  });
}

void ppo_value_loss(const float* v, const float* old, const float* ret, const float* mask,
                    int64_t n, double clip, float* loss, float* clipfrac) {
  reduce(ValueSummands{v, old, ret, mask, static_cast<float>(clip)}, n,
         ValueFinish{loss, clipfrac});
}

void ppo_value_loss_backward(const float* grad_loss, const float* v, const float* old,
                             const float* ret, const float* mask, int64_t n, double clip,
                             float* grad) {
  float scale = 0.f;
  reduce(MaskSummands{mask}, n, GradScaleFinish{grad_loss, &scale});
  emulation::launch(elementwise_grid(n), kThreads, 0, [&] {
    ppo_value_loss_backward_kernel(&scale, v, old, ret, mask, static_cast<float>(clip), n, grad);
  });
}

}  // extern "C"
