// The operator schemas of minalign's extension, in one place.
//
// Each kernel family registers its CPU and CUDA implementations with
// TORCH_LIBRARY_IMPL in its own file; minalign/op_registration.py adds the fake (meta)
// kernels and autograd; minalign/ops.py is the only public entry point.
//
// Conventions shared by every op:
//   - float32 outputs; `logits` may be float32, bfloat16 or float16, every other
//     floating input is float32;
//   - `mask` tensors are float32 0/1 of the shape of the tensor they mask;
//   - masked means divide by max(sum(mask), 1);
//   - inputs must be contiguous and on one device.

#include <torch/library.h>

TORCH_LIBRARY(minalign, m) {
  // logits [N, V], labels [N] int64 -> logprobs [N] (0 where labels == ignore_index),
  // lse [N] (log-sum-exp of each row), entropy [N] (an empty tensor unless with_entropy).
  // inplace_backward is read by autograd only (minalign/op_registration.py): it picks
  // the backward below.
  m.def(
      "token_logprobs(Tensor logits, Tensor labels, int ignore_index, bool with_entropy,"
      " bool inplace_backward=False) -> (Tensor logprobs, Tensor lse, Tensor entropy)");
  // d/dlogits of sum(grad_logprobs * logprobs + grad_entropy * entropy), in the dtype of logits.
  m.def(
      "token_logprobs_backward(Tensor grad_logprobs, Tensor? grad_entropy, Tensor logits,"
      " Tensor labels, Tensor lse, Tensor? entropy, int ignore_index) -> Tensor");
  // The same gradient written over logits, which it destroys (no new [N, V] tensor).
  m.def(
      "token_logprobs_backward_(Tensor grad_logprobs, Tensor? grad_entropy, Tensor(a!) logits,"
      " Tensor labels, Tensor lse, Tensor? entropy, int ignore_index) -> ()");
  // The forward and the backward at once, for a loss linear in the log-probs whose weights
  // are known beforehand (SFT's cross-entropy): returns logprobs [N] and overwrites logits
  // with d/dlogits of sum(weights * logprobs).
  m.def(
      "token_logprobs_fused_(Tensor(a!) logits, Tensor labels, Tensor weights, int ignore_index)"
      " -> Tensor logprobs");

  // Per-pair DPO-family losses and (detached) implicit rewards, all [B].
  // loss_type: 0 sigmoid, 1 ipo, 2 hinge, 3 robust.
  m.def(
      "dpo_loss(Tensor policy_chosen_logps, Tensor policy_rejected_logps, Tensor ref_chosen_logps,"
      " Tensor ref_rejected_logps, float beta, int loss_type, float label_smoothing)"
      " -> (Tensor losses, Tensor chosen_rewards, Tensor rejected_rewards)");
  // Gradients of sum(grad_losses * losses) w.r.t. the policy chosen and rejected log-probs.
  m.def(
      "dpo_loss_backward(Tensor grad_losses, Tensor policy_chosen_logps, Tensor policy_rejected_logps,"
      " Tensor ref_chosen_logps, Tensor ref_rejected_logps, float beta, int loss_type,"
      " float label_smoothing) -> (Tensor grad_chosen, Tensor grad_rejected)");

  // PPO clipped surrogate over [B, T]: 0-dim loss, clip fraction and approx KL (masked means).
  m.def(
      "ppo_policy_loss(Tensor logprobs, Tensor old_logprobs, Tensor advantages, Tensor mask,"
      " float clip_eps) -> (Tensor loss, Tensor clipfrac, Tensor approx_kl)");
  m.def(
      "ppo_policy_loss_backward(Tensor grad_loss, Tensor logprobs, Tensor old_logprobs,"
      " Tensor advantages, Tensor mask, float clip_eps) -> Tensor");

  // PPO clipped value loss over [B, T]: 0-dim loss and clip fraction (masked means).
  m.def(
      "ppo_value_loss(Tensor values, Tensor old_values, Tensor returns, Tensor mask, float clip)"
      " -> (Tensor loss, Tensor clipfrac)");
  m.def(
      "ppo_value_loss_backward(Tensor grad_loss, Tensor values, Tensor old_values, Tensor returns,"
      " Tensor mask, float clip) -> Tensor");

  // Generalised advantage estimation over right-padded [B, T]; no gradient.
  m.def(
      "gae(Tensor rewards, Tensor values, Tensor mask, float gamma, float lam)"
      " -> (Tensor advantages, Tensor returns)");
}
