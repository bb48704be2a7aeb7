// Generalised advantage estimation (Schulman et al. 2016) on the CPU, for right-padded
// [B, T] rollouts. No gradient.
//
// With r' = r m and v' = v m (a position whose mask is 0 counts as after the end),
// v'_T = 0 and A_T = 0, going backwards in t:
//   delta_t = r'_t + gamma v'_{t+1} - v'_t
//   A_t     = m_t (delta_t + gamma lam A_{t+1})
//   R_t     = A_t + v'_t            (the returns the value head regresses on)
// The recursion runs along t, so rows are independent: one task per block of rows,
// each a single backward sweep holding v'_{t+1} and A_{t+1} in registers.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "dtype_name.h"

namespace minalign {
namespace {

std::tuple<at::Tensor, at::Tensor> gae_cpu(const at::Tensor& rewards, const at::Tensor& values,
                                           const at::Tensor& mask, double gamma, double lam) {
  for (auto [name, t] : {std::pair{"rewards", &rewards}, {"values", &values}, {"mask", &mask}}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat, "minalign.gae: ", name, " must be float32, got ", dtype_name(t->scalar_type()));
    TORCH_CHECK(t->device().is_cpu(), "minalign.gae: ", name, " must be on the same device as rewards, got ",
                t->device(), " and ", rewards.device());
    TORCH_CHECK(t->dim() == 2, "minalign.gae: ", name, " must be 2-D [B, T], got shape ", t->sizes());
    TORCH_CHECK(t->sizes() == rewards.sizes(), "minalign.gae: ", name, " has shape ", t->sizes(),
                " but rewards has shape ", rewards.sizes());
    TORCH_CHECK(t->is_contiguous(), "minalign.gae: ", name, " must be contiguous (call .contiguous())");
  }
  TORCH_CHECK(rewards.numel() > 0, "minalign.gae: empty batch (rewards has shape ", rewards.sizes(), ")");
  TORCH_CHECK(0 <= gamma && gamma <= 1 && 0 <= lam && lam <= 1, "minalign.gae: gamma and lam must be in [0, 1], got ",
              gamma, " and ", lam);

  const int64_t B = rewards.size(0), T = rewards.size(1);
  at::Tensor advantages = at::empty_like(rewards), returns = at::empty_like(rewards);
  const float *r = rewards.const_data_ptr<float>(), *v = values.const_data_ptr<float>(),
              *m = mask.const_data_ptr<float>();
  float *adv = advantages.mutable_data_ptr<float>(), *ret = returns.mutable_data_ptr<float>();
  const float g = static_cast<float>(gamma), gl = static_cast<float>(gamma * lam);
  // Each task takes at least 65,536 positions (tens of microseconds): a rollout smaller
  // than that runs on the calling thread, where waking a second one costs more than it
  // saves, and far more when the other core is busy.
  at::parallel_for(0, B, std::max<int64_t>(1, 65536 / T), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t row = b * T;
      float next_value = 0.f, next_adv = 0.f;  // v'_{t+1}, A_{t+1}
      for (int64_t t = T - 1; t >= 0; --t) {
        const int64_t i = row + t;
        const float value = v[i] * m[i];
        const float delta = r[i] * m[i] + g * next_value - value;
        next_adv = m[i] * (delta + gl * next_adv);
        adv[i] = next_adv;
        ret[i] = next_adv + value;
        next_value = value;
      }
    }
  });
  return {advantages, returns};
}

}  // namespace

TORCH_LIBRARY_IMPL(minalign, CPU, m) { m.impl("gae", &gae_cpu); }

}  // namespace minalign
