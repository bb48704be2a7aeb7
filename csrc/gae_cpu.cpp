// Generalised advantage estimation (Schulman et al. 2016) on the CPU, for right-padded
// [B, T] rollouts. No gradient.
//
// With r' = r m and v' = v m (a position whose mask is 0 counts as after the end),
// v'_T = 0 and A_T = 0, going backwards in t:
//   delta_t = r'_t + gamma v'_{t+1} - v'_t
//   A_t     = m_t (delta_t + gamma lam A_{t+1})
//   R_t     = A_t + v'_t            (the returns the value head regresses on)
// The recursion runs along t, so rows are independent: one task per block of rows,
// each a backward sweep holding v'_{t+1} and A_{t+1} in registers. Each step of a row
// waits for the one before (two dependent multiply-adds), so a task sweeps kRows rows
// at once, in lockstep, to keep the core busy while each chain waits.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "dtype_name.h"

namespace minalign {
namespace {

constexpr int kRows = 8;

// The recursion above for kN consecutive rows of length T, from their first elements.
template <int kN>
void sweep_rows(const float* r, const float* v, const float* m, float* adv, float* ret, int64_t T, float g,
                float gl) {
  float next_value[kN] = {}, next_adv[kN] = {};  // v'_{t+1}, A_{t+1} of each row
  for (int64_t t = T - 1; t >= 0; --t) {
    for (int k = 0; k < kN; ++k) {
      const int64_t i = k * T + t;
      const float value = v[i] * m[i];
      const float delta = r[i] * m[i] + g * next_value[k] - value;
      next_adv[k] = m[i] * (delta + gl * next_adv[k]);
      adv[i] = next_adv[k];
      ret[i] = next_adv[k] + value;
      next_value[k] = value;
    }
  }
}

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
    int64_t b = begin;
    for (; b + kRows <= end; b += kRows) {
      const int64_t o = b * T;  // int64: B * T may exceed 2^31
      sweep_rows<kRows>(r + o, v + o, m + o, adv + o, ret + o, T, g, gl);
    }
    for (; b < end; ++b) sweep_rows<1>(r + b * T, v + b * T, m + b * T, adv + b * T, ret + b * T, T, g, gl);
  });
  return {advantages, returns};
}

}  // namespace

TORCH_LIBRARY_IMPL(minalign, CPU, m) { m.impl("gae", &gae_cpu); }

}  // namespace minalign
