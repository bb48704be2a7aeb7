"""How the C++/CUDA kernels of minalign._C plug into PyTorch: fake kernels and autograd.

Importing minalign._C runs its TORCH_LIBRARY block, which declares each op's schema
(csrc/ops.cpp) and registers the CPU and CUDA kernels. What a kernel cannot say for
itself is added here, in Python:

- a fake (meta) kernel per op: the shapes and dtypes of its outputs, computed without
  touching data, which is what torch.compile and torch.library.opcheck trace with;
- the backward of each differentiable op (torch.library.register_autograd), which
  calls the op's backward kernel. The backward ops have no backward of their own: their
  autograd raises, so that a gradient of a gradient fails instead of being zero.

minalign.ops imports this module only when the extension is built.
"""

import torch


# ---------------------------------------------------------------------- token_logprobs and the fused forward

@torch.library.register_fake("minalign::token_logprobs")
def _(logits, labels, ignore_index, with_entropy, inplace_backward=False):
    n = logits.shape[0]
    return (logits.new_empty(n, dtype=torch.float32), logits.new_empty(n, dtype=torch.float32),
            logits.new_empty(n if with_entropy else 0, dtype=torch.float32))


@torch.library.register_fake("minalign::token_logprobs_backward")
def _(grad_logprobs, grad_entropy, logits, labels, lse, entropy, ignore_index):
    return torch.empty_like(logits)


@torch.library.register_fake("minalign::token_logprobs_backward_")
def _(grad_logprobs, grad_entropy, logits, labels, lse, entropy, ignore_index):
    return None


@torch.library.register_fake("minalign::token_logprobs_fused_")
def _(logits, labels, weights, ignore_index):
    return logits.new_empty(logits.shape[0], dtype=torch.float32)


def _token_logprobs_setup(ctx, inputs, output):
    logits, labels, ctx.ignore_index, ctx.with_entropy, *rest = inputs
    ctx.inplace_backward = bool(rest and rest[0])  # the schema's default is False
    _, lse, entropy = output
    ctx.save_for_backward(logits, labels, lse, entropy)


def _token_logprobs_backward(ctx, grad_logprobs, grad_lse, grad_entropy):
    logits, labels, lse, entropy = ctx.saved_tensors  # lse is internal: its gradient is never used
    if not ctx.with_entropy:
        grad_entropy = entropy = None
    args = (grad_logprobs.contiguous(), None if grad_entropy is None else grad_entropy.contiguous(),
            logits.detach(), labels, lse, entropy, ctx.ignore_index)
    if not ctx.inplace_backward:
        return torch.ops.minalign.token_logprobs_backward(*args), None, None, None, None
    if torch.is_grad_enabled():  # backward(create_graph=True): the result would have no graph
        raise RuntimeError("minalign.token_logprobs: inplace_backward=True gives first derivatives only; "
                           "a backward with create_graph=True needs inplace_backward=False")
    torch.ops.minalign.token_logprobs_backward_(*args)
    # The dispatcher does not count this write; counting it makes any node that saved the
    # logits and runs later (or a second backward) fail instead of reading the gradient.
    torch.autograd.graph.increment_version(logits)
    return args[2], None, None, None, None


torch.library.register_autograd(
    "minalign::token_logprobs", _token_logprobs_backward, setup_context=_token_logprobs_setup)


# ---------------------------------------------------------------------- dpo_loss

@torch.library.register_fake("minalign::dpo_loss")
def _(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta, loss_type,
      label_smoothing):
    return tuple(torch.empty_like(policy_chosen_logps) for _ in range(3))


@torch.library.register_fake("minalign::dpo_loss_backward")
def _(grad_losses, policy_chosen_logps, *args):
    return torch.empty_like(policy_chosen_logps), torch.empty_like(policy_chosen_logps)


def _dpo_setup(ctx, inputs, output):
    *logps, ctx.beta, ctx.loss_type, ctx.label_smoothing = inputs
    ctx.save_for_backward(*logps)


def _dpo_backward(ctx, grad_losses, grad_chosen_rewards, grad_rejected_rewards):
    grad_chosen, grad_rejected = torch.ops.minalign.dpo_loss_backward(
        grad_losses.contiguous(), *ctx.saved_tensors, ctx.beta, ctx.loss_type, ctx.label_smoothing)
    return grad_chosen, grad_rejected, None, None, None, None, None


torch.library.register_autograd("minalign::dpo_loss", _dpo_backward, setup_context=_dpo_setup)


# ---------------------------------------------------------------------- ppo_policy_loss

@torch.library.register_fake("minalign::ppo_policy_loss")
def _(logprobs, old_logprobs, advantages, mask, clip_eps):
    return tuple(logprobs.new_empty(()) for _ in range(3))


@torch.library.register_fake("minalign::ppo_policy_loss_backward")
def _(grad_loss, logprobs, old_logprobs, advantages, mask, clip_eps):
    return torch.empty_like(logprobs)


def _ppo_policy_setup(ctx, inputs, output):
    *tensors, ctx.clip_eps = inputs
    ctx.save_for_backward(*tensors)


def _ppo_policy_backward(ctx, grad_loss, grad_clipfrac, grad_approx_kl):
    grad = torch.ops.minalign.ppo_policy_loss_backward(grad_loss, *ctx.saved_tensors, ctx.clip_eps)
    return grad, None, None, None, None


torch.library.register_autograd(
    "minalign::ppo_policy_loss", _ppo_policy_backward, setup_context=_ppo_policy_setup)


# ---------------------------------------------------------------------- ppo_value_loss

@torch.library.register_fake("minalign::ppo_value_loss")
def _(values, old_values, returns, mask, clip):
    return values.new_empty(()), values.new_empty(())


@torch.library.register_fake("minalign::ppo_value_loss_backward")
def _(grad_loss, values, old_values, returns, mask, clip):
    return torch.empty_like(values)


def _ppo_value_setup(ctx, inputs, output):
    *tensors, ctx.clip = inputs
    ctx.save_for_backward(*tensors)


def _ppo_value_backward(ctx, grad_loss, grad_clipfrac):
    grad = torch.ops.minalign.ppo_value_loss_backward(grad_loss, *ctx.saved_tensors, ctx.clip)
    return grad, None, None, None, None


torch.library.register_autograd("minalign::ppo_value_loss", _ppo_value_backward, setup_context=_ppo_value_setup)


# ---------------------------------------------------------------------- gae: no backward (its outputs are targets)

@torch.library.register_fake("minalign::gae")
def _(rewards, values, mask, gamma, lam):
    return torch.empty_like(rewards), torch.empty_like(rewards)


# ---------------------------------------------------------------------- no double backward


def _refuse_double_backward(op):
    def backward(ctx, *grads):
        raise RuntimeError(f"minalign::{op}: the kernels give first derivatives only, so a gradient of this "
                           f"gradient (double backward) is not supported; minalign.reference's ops support it")
    return backward


for _op in ("token_logprobs_backward", "dpo_loss_backward", "ppo_policy_loss_backward", "ppo_value_loss_backward"):
    torch.library.register_autograd(f"minalign::{_op}", _refuse_double_backward(_op))
