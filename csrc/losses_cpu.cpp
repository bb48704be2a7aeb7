// The DPO-family and PPO losses on the CPU, forward and backward.
//
// DPO (per pair; Rafailov et al. 2023 and its variants). With the margin
//   h = (pi_chosen - pi_rejected) - (ref_chosen - ref_rejected),  z = beta h,
// label smoothing e, and d/dz log sigmoid(z) = sigmoid(-z):
//   0 sigmoid: L = -(1-e) log s(z) - e log s(-z)           dL/dh = beta (-(1-e) s(-z) + e s(z))
//   1 ipo:     L = (h - 1/(2 beta))^2                       dL/dh = 2 (h - 1/(2 beta))
//   2 hinge:   L = max(0, 1 - z)                            dL/dh = -beta [not 1 - z <= 0]
//   3 robust:  L = (-(1-e) log s(z) + e log s(-z)) / (1-2e) dL/dh = beta (-(1-e) s(-z) - e s(z)) / (1-2e)
// The gradient w.r.t. pi_chosen is dL/dh and w.r.t. pi_rejected -dL/dh; the reference
// log-probs are constants. Rewards: beta (pi - ref), detached.
//
// PPO (masked means over [B, T], n = max(sum(mask), 1); the clipped surrogate of
// Schulman et al. 2017, the value clipping of OpenAI's implementations):
//   r = e^{logp - old}, pg1 = -A r, pg2 = -A clip(r, 1-eps, 1+eps)
//   loss = sum m max(pg1, pg2) / n,  clipfrac = sum m [pg2 > pg1] / n,
//   approx_kl = sum m (logp - old)^2 / (2 n)
//   dloss/dlogp = m / n * (w1 + w2 [1-eps < r < 1+eps]) (-A r)
// Value loss, v_c = old + clip(v - old, -c, c):
//   loss = sum m max((v-R)^2, (v_c-R)^2) / (2 n),  clipfrac = sum m [(v_c-R)^2 > (v-R)^2] / n
//   dloss/dv = m / n * (w1 (v-R) + w2 (v_c-R) [|v-old| < c])
// w1, w2 are torch.maximum's backward: all to the larger term, half each on a tie, and
// 1 each when either is NaN (whose max is NaN, as torch.maximum's, not std::max's). The
// clip passes a gradient strictly inside its interval (minalign.reference.clamp); the
// hinge, like torch.relu, passes one wherever 1 - z <= 0 fails, NaN included.
//
// All maps are elementwise over a few thousand numbers: serial loops with double sums
// keep them exact enough and deterministic. Nothing of size [B, T] is materialised
// besides the gradients.

#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <initializer_list>
#include <utility>

#include "dtype_name.h"

namespace minalign {
namespace {

// Every tensor float32, contiguous, on the CPU, with the shape of the first, of rank `dim`.
void check_same(const char* op, int64_t dim, std::initializer_list<std::pair<const char*, const at::Tensor*>> ts) {
  const at::Tensor& first = *ts.begin()->second;
  for (auto [name, t] : ts) {
    TORCH_CHECK(t->scalar_type() == at::kFloat, "minalign.", op, ": ", name, " must be float32, got ", dtype_name(t->scalar_type()));
    TORCH_CHECK(t->device().is_cpu(), "minalign.", op, ": ", name, " must be on the same device as ",
                ts.begin()->first, ", got ", t->device(), " and ", first.device());
    TORCH_CHECK(t->dim() == dim, "minalign.", op, ": ", name, " must be ", dim, "-D, got shape ", t->sizes());
    TORCH_CHECK(t->sizes() == first.sizes(), "minalign.", op, ": ", name, " has shape ", t->sizes(), " but ",
                ts.begin()->first, " has shape ", first.sizes());
    TORCH_CHECK(t->is_contiguous(), "minalign.", op, ": ", name, " must be contiguous (call .contiguous())");
  }
  TORCH_CHECK(first.numel() > 0, "minalign.", op, ": empty batch (", ts.begin()->first, " has shape ", first.sizes(), ")");
}

// ------------------------------------------------------------------------------------ DPO

double log_sigmoid(double z) { return std::min(z, 0.0) - std::log1p(std::exp(-std::abs(z))); }
double sigmoid(double z) { return 1.0 / (1.0 + std::exp(-z)); }

void check_dpo(const at::Tensor& pc, const at::Tensor& pr, const at::Tensor& rc, const at::Tensor& rr, double beta,
               int64_t loss_type, double eps) {
  check_same("dpo_loss", 1, {{"policy_chosen_logps", &pc}, {"policy_rejected_logps", &pr},
                             {"ref_chosen_logps", &rc}, {"ref_rejected_logps", &rr}});
  TORCH_CHECK(0 <= loss_type && loss_type <= 3, "minalign.dpo_loss: loss_type must be 0 (sigmoid), 1 (ipo), 2 (hinge) or 3 (robust), got ", loss_type);
  TORCH_CHECK(beta > 0, "minalign.dpo_loss: beta must be > 0, got ", beta);
  TORCH_CHECK(0 <= eps && eps < 0.5, "minalign.dpo_loss: label_smoothing must be in [0, 0.5), got ", eps);
}

double dpo_loss_of(double h, double beta, int64_t type, double e) {
  const double z = beta * h;
  switch (type) {
    case 0: return -(1 - e) * log_sigmoid(z) - e * log_sigmoid(-z);
    case 1: return (h - 1 / (2 * beta)) * (h - 1 / (2 * beta));
    case 2: return 1 - z <= 0 ? 0.0 : 1 - z;  // NaN stays NaN, as in torch.relu
    default: return (-(1 - e) * log_sigmoid(z) + e * log_sigmoid(-z)) / (1 - 2 * e);
  }
}

double dpo_grad_of(double h, double beta, int64_t type, double e) {  // dL/dh
  const double z = beta * h;
  switch (type) {
    case 0: return beta * (-(1 - e) * sigmoid(-z) + e * sigmoid(z));
    case 1: return 2 * (h - 1 / (2 * beta));
    case 2: return 1 - z <= 0 ? 0.0 : -beta;
    default: return beta * (-(1 - e) * sigmoid(-z) - e * sigmoid(z)) / (1 - 2 * e);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dpo_loss_cpu(const at::Tensor& pc, const at::Tensor& pr,
                                                            const at::Tensor& rc, const at::Tensor& rr, double beta,
                                                            int64_t loss_type, double label_smoothing) {
  check_dpo(pc, pr, rc, rr, beta, loss_type, label_smoothing);
  at::Tensor losses = at::empty_like(pc), chosen = at::empty_like(pc), rejected = at::empty_like(pc);
  const float *a = pc.const_data_ptr<float>(), *b = pr.const_data_ptr<float>();
  const float *c = rc.const_data_ptr<float>(), *d = rr.const_data_ptr<float>();
  float *l = losses.mutable_data_ptr<float>(), *cr = chosen.mutable_data_ptr<float>(),
        *rj = rejected.mutable_data_ptr<float>();
  for (int64_t i = 0; i < pc.numel(); ++i) {
    const double h = (double(a[i]) - b[i]) - (double(c[i]) - d[i]);
    l[i] = static_cast<float>(dpo_loss_of(h, beta, loss_type, label_smoothing));
    cr[i] = static_cast<float>(beta * (double(a[i]) - c[i]));
    rj[i] = static_cast<float>(beta * (double(b[i]) - d[i]));
  }
  return {losses, chosen, rejected};
}

std::tuple<at::Tensor, at::Tensor> dpo_loss_backward_cpu(const at::Tensor& grad_losses, const at::Tensor& pc,
                                                         const at::Tensor& pr, const at::Tensor& rc,
                                                         const at::Tensor& rr, double beta, int64_t loss_type,
                                                         double label_smoothing) {
  check_dpo(pc, pr, rc, rr, beta, loss_type, label_smoothing);
  check_same("dpo_loss_backward", 1, {{"policy_chosen_logps", &pc}, {"grad_losses", &grad_losses}});
  at::Tensor grad_chosen = at::empty_like(pc), grad_rejected = at::empty_like(pc);
  const float *g = grad_losses.const_data_ptr<float>(), *a = pc.const_data_ptr<float>(),
              *b = pr.const_data_ptr<float>(), *c = rc.const_data_ptr<float>(), *d = rr.const_data_ptr<float>();
  float *gc = grad_chosen.mutable_data_ptr<float>(), *gr = grad_rejected.mutable_data_ptr<float>();
  for (int64_t i = 0; i < pc.numel(); ++i) {
    const double h = (double(a[i]) - b[i]) - (double(c[i]) - d[i]);
    const double dh = g[i] * dpo_grad_of(h, beta, loss_type, label_smoothing);
    gc[i] = static_cast<float>(dh);
    gr[i] = static_cast<float>(-dh);
  }
  return {grad_chosen, grad_rejected};
}

// ------------------------------------------------------------------------------------ PPO

// torch.maximum: NaN if either argument is (std::max(a, NaN) would return a).
float maximum(float a, float b) { return (a != a || b != b) ? a + b : std::max(a, b); }

// Weights of torch.maximum(a, b)'s backward for a and for b.
std::pair<double, double> maximum_weights(float a, float b) {
  if (a == b) return {0.5, 0.5};
  return {a < b ? 0.0 : 1.0, b < a ? 0.0 : 1.0};  // with a NaN: 1 and 1
}

double mask_count(const float* m, int64_t n) {
  double s = 0;
  for (int64_t i = 0; i < n; ++i) s += m[i];
  return std::max(s, 1.0);
}

void check_ppo_policy(const at::Tensor& lp, const at::Tensor& old, const at::Tensor& adv, const at::Tensor& mask,
                      double clip_eps) {
  check_same("ppo_policy_loss", 2, {{"logprobs", &lp}, {"old_logprobs", &old}, {"advantages", &adv}, {"mask", &mask}});
  TORCH_CHECK(clip_eps >= 0, "minalign.ppo_policy_loss: clip_eps must be >= 0, got ", clip_eps);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ppo_policy_loss_cpu(const at::Tensor& logprobs,
                                                                   const at::Tensor& old_logprobs,
                                                                   const at::Tensor& advantages,
                                                                   const at::Tensor& mask, double clip_eps) {
  check_ppo_policy(logprobs, old_logprobs, advantages, mask, clip_eps);
  const float *lp = logprobs.const_data_ptr<float>(), *old = old_logprobs.const_data_ptr<float>(),
              *A = advantages.const_data_ptr<float>(), *m = mask.const_data_ptr<float>();
  const int64_t n = logprobs.numel();
  const float lo = static_cast<float>(1 - clip_eps), hi = static_cast<float>(1 + clip_eps);
  double loss = 0, clipped = 0, kl = 0;
  for (int64_t i = 0; i < n; ++i) {
    const float diff = lp[i] - old[i];
    const float r = std::exp(diff);
    const float pg1 = -A[i] * r, pg2 = -A[i] * std::clamp(r, lo, hi);
    loss += m[i] * double(maximum(pg1, pg2));
    clipped += m[i] * double(pg2 > pg1);
    kl += m[i] * double(diff) * diff;
  }
  const double count = mask_count(m, n);
  auto scalar = [&](double v) { return at::scalar_tensor(v, logprobs.options()); };
  return {scalar(loss / count), scalar(clipped / count), scalar(0.5 * kl / count)};
}

at::Tensor ppo_policy_loss_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& logprobs,
                                        const at::Tensor& old_logprobs, const at::Tensor& advantages,
                                        const at::Tensor& mask, double clip_eps) {
  check_ppo_policy(logprobs, old_logprobs, advantages, mask, clip_eps);
  TORCH_CHECK(grad_loss.numel() == 1 && grad_loss.scalar_type() == at::kFloat && grad_loss.device().is_cpu(),
              "minalign.ppo_policy_loss_backward: grad_loss must be a float32 scalar on the CPU");
  const float *lp = logprobs.const_data_ptr<float>(), *old = old_logprobs.const_data_ptr<float>(),
              *A = advantages.const_data_ptr<float>(), *m = mask.const_data_ptr<float>();
  const int64_t n = logprobs.numel();
  const float lo = static_cast<float>(1 - clip_eps), hi = static_cast<float>(1 + clip_eps);
  const double scale = grad_loss.item<float>() / mask_count(m, n);
  at::Tensor grad = at::empty_like(logprobs);
  float* out = grad.mutable_data_ptr<float>();
  for (int64_t i = 0; i < n; ++i) {
    const float r = std::exp(lp[i] - old[i]);
    const float pg1 = -A[i] * r, pg2 = -A[i] * std::clamp(r, lo, hi);
    // max(pg1, pg2) splits its gradient as torch.maximum does; through pg2 only strictly
    // inside [lo, hi], where the clamp has slope 1. Each branch's gradient is -A r.
    const auto [to_pg1, w2] = maximum_weights(pg1, pg2);
    const double to_pg2 = lo < r && r < hi ? w2 : 0.0;
    out[i] = static_cast<float>(scale * m[i] * (to_pg1 + to_pg2) * (-A[i] * r));
  }
  return grad;
}

void check_ppo_value(const at::Tensor& v, const at::Tensor& old, const at::Tensor& ret, const at::Tensor& mask,
                     double clip) {
  check_same("ppo_value_loss", 2, {{"values", &v}, {"old_values", &old}, {"returns", &ret}, {"mask", &mask}});
  TORCH_CHECK(clip >= 0, "minalign.ppo_value_loss: clip must be >= 0, got ", clip);
}

std::tuple<at::Tensor, at::Tensor> ppo_value_loss_cpu(const at::Tensor& values, const at::Tensor& old_values,
                                                      const at::Tensor& returns, const at::Tensor& mask, double clip) {
  check_ppo_value(values, old_values, returns, mask, clip);
  const float *v = values.const_data_ptr<float>(), *old = old_values.const_data_ptr<float>(),
              *R = returns.const_data_ptr<float>(), *m = mask.const_data_ptr<float>();
  const int64_t n = values.numel();
  const float c = static_cast<float>(clip);
  double loss = 0, clipped = 0;
  for (int64_t i = 0; i < n; ++i) {
    const float vc = old[i] + std::clamp(v[i] - old[i], -c, c);
    const float l1 = (v[i] - R[i]) * (v[i] - R[i]), l2 = (vc - R[i]) * (vc - R[i]);
    loss += m[i] * double(maximum(l1, l2));
    clipped += m[i] * double(l2 > l1);
  }
  const double count = mask_count(m, n);
  auto scalar = [&](double x) { return at::scalar_tensor(x, values.options()); };
  return {scalar(0.5 * loss / count), scalar(clipped / count)};
}

at::Tensor ppo_value_loss_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& values,
                                       const at::Tensor& old_values, const at::Tensor& returns, const at::Tensor& mask,
                                       double clip) {
  check_ppo_value(values, old_values, returns, mask, clip);
  TORCH_CHECK(grad_loss.numel() == 1 && grad_loss.scalar_type() == at::kFloat && grad_loss.device().is_cpu(),
              "minalign.ppo_value_loss_backward: grad_loss must be a float32 scalar on the CPU");
  const float *v = values.const_data_ptr<float>(), *old = old_values.const_data_ptr<float>(),
              *R = returns.const_data_ptr<float>(), *m = mask.const_data_ptr<float>();
  const int64_t n = values.numel();
  const float c = static_cast<float>(clip);
  const double scale = grad_loss.item<float>() / mask_count(m, n);  // d(0.5 x^2)/dx = x
  at::Tensor grad = at::empty_like(values);
  float* out = grad.mutable_data_ptr<float>();
  for (int64_t i = 0; i < n; ++i) {
    const float delta = v[i] - old[i];
    const float vc = old[i] + std::clamp(delta, -c, c);
    const float l1 = (v[i] - R[i]) * (v[i] - R[i]), l2 = (vc - R[i]) * (vc - R[i]);
    const double unclipped = v[i] - R[i];
    const double clipped = (-c < delta && delta < c) ? double(vc - R[i]) : 0.0;  // see above
    const auto [w1, w2] = maximum_weights(l1, l2);
    const double d = w1 * unclipped + w2 * clipped;
    out[i] = static_cast<float>(scale * m[i] * d);
  }
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(minalign, CPU, m) {
  m.impl("dpo_loss", &dpo_loss_cpu);
  m.impl("dpo_loss_backward", &dpo_loss_backward_cpu);
  m.impl("ppo_policy_loss", &ppo_policy_loss_cpu);
  m.impl("ppo_policy_loss_backward", &ppo_policy_loss_backward_cpu);
  m.impl("ppo_value_loss", &ppo_value_loss_cpu);
  m.impl("ppo_value_loss_backward", &ppo_value_loss_backward_cpu);
}

}  // namespace minalign
