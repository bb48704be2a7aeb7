"""Plain PyTorch versions of minalign's fused operators: the specification.

Each function is the obvious implementation of its formula, written to be checked
against the paper. `minalign.ops` runs the C++/CUDA kernels when they are built and
these functions otherwise; the tests hold the kernels to their values and gradients.
Inputs are not validated here (`minalign.ops` does that).
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


class SequenceLogprobs(NamedTuple):
    token_logps: Tensor  # [B, T] log p(labels[b, t]), 0 where mask is 0
    sum_logps: Tensor  # [B] log-probability of each sequence (sum over its masked tokens)
    mean_logps: Tensor  # [B] sum_logps / number of tokens (length-normalised; DPO's IPO loss uses it, minalign/dpo.py)
    entropy: Tensor | None  # [B, T] entropy of each predicted distribution, 0 where mask is 0


class DPOLoss(NamedTuple):
    losses: Tensor  # [B] per-pair loss; take .mean() to train
    chosen_rewards: Tensor  # [B] beta * (policy - ref) log-prob of the chosen answer, detached
    rejected_rewards: Tensor  # [B] the same for the rejected answer, detached


class PolicyLoss(NamedTuple):
    loss: Tensor  # 0-dim clipped surrogate loss (masked mean)
    clipfrac: Tensor  # 0-dim fraction of tokens where the clipped branch is taken, detached
    approx_kl: Tensor  # 0-dim masked mean of (logp - old_logp)^2 / 2, detached


class ValueLoss(NamedTuple):
    loss: Tensor  # 0-dim clipped value loss (masked mean, times 1/2)
    clipfrac: Tensor  # 0-dim fraction of tokens where the clipped value's error is larger, detached


IGNORE_INDEX = -100  # a label that takes no part in the loss (cross_entropy's default)


class GAE(NamedTuple):
    advantages: Tensor  # [B, T], 0 where mask is 0
    returns: Tensor  # [B, T] advantages + values: the value head's targets, 0 where mask is 0


def token_logprobs(logits: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX, return_entropy: bool = False):
    """log p(label) for every row of logits, and optionally every row's entropy.

        logp_i = x_{i, y_i} - log sum_j exp(x_ij)      (0 where y_i == ignore_index)
        H_i    = -sum_j p_ij log p_ij,  p = softmax(x)  (0 log 0 = 0; 0 where ignored)

    logits [..., V] (float32, bfloat16 or float16), labels [...] int64. Returns float32
    [...] and, with return_entropy, the entropy [...] too. Logits of -inf get probability
    0 and add nothing to the entropy. This version materialises the [..., V]
    log-softmax in float32, which the kernels never do.
    """
    logp = logits.float().log_softmax(dim=-1)  # [..., V]
    keep = labels != ignore_index  # [...]
    picked = logp.gather(-1, labels.masked_fill(~keep, 0).unsqueeze(-1)).squeeze(-1)  # [...]
    logprobs = torch.where(keep, picked, 0.0)
    if not return_entropy:
        return logprobs
    p = logp.exp()
    # where p = 0 (a -inf logit) the term is 0, and so is its gradient (p * logp would give NaN)
    entropy = -(p * torch.where(p > 0, logp, 0.0)).sum(-1)  # [...]
    return logprobs, torch.where(keep, entropy, 0.0)


def weighted_logprob_sum(logits: Tensor, labels: Tensor, weights: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """sum_i w_i logp_i over the rows of logits, a 0-dim float32 tensor (ignored rows add 0).

    With w_i = -1/n on the n rows whose label is not ignore_index this is
    F.cross_entropy's default mean. Its gradient is w_i ([j == y_i] - p_ij).
    """
    return (weights.float() * token_logprobs(logits, labels, ignore_index)).sum()


def sequence_logprobs(logits: Tensor, labels: Tensor, mask: Tensor, return_entropy: bool = False) -> SequenceLogprobs:
    """Per-token and per-sequence log-probabilities of labels under logits.

        token_logps[b, t] = m[b, t] log p(labels[b, t] | logits[b, t])
        sum_logps[b]      = sum_t token_logps[b, t]
        mean_logps[b]     = sum_logps[b] / max(sum_t m[b, t], 1)

    logits [B, T, V], labels [B, T] already aligned (labels[b, t] is the token that
    logits[b, t] predicts), mask [B, T] (1 for the tokens that count). Labels under a
    0 mask may hold anything (padding, IGNORE_INDEX).
    """
    mask = mask.float()
    labels = labels.masked_fill(mask == 0, IGNORE_INDEX)
    out = token_logprobs(logits, labels, IGNORE_INDEX, return_entropy)
    token_logps, entropy = out if return_entropy else (out, None)
    sum_logps = token_logps.sum(-1)  # [B]
    return SequenceLogprobs(token_logps, sum_logps, sum_logps / mask.sum(-1).clamp(min=1), entropy)


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> DPOLoss:
    """Per-pair DPO-family losses and implicit rewards, all [B].

    With the margin h = (pi_c - pi_r) - (ref_c - ref_r) of the log-probs passed in
    (sequence log-probs, summed over tokens, for all but IPO) and e = label_smoothing:
      sigmoid: -(1-e) log s(beta h) - e log s(-beta h)       DPO, Rafailov et al. 2023;
               e > 0 is conservative DPO (Mitchell 2023)
      ipo:     (h - 1/(2 beta))^2                            IPO, Azar et al. 2023, eq. 17
      hinge:   max(0, 1 - beta h) = beta max(0, 1/beta - h)  SLiC's calibration hinge
               (Zhao et al. 2023) with margin 1/beta, on log-ratios to the reference
               rather than raw log-probs: the normalised hinge of RSO (Liu et al. 2023)
      robust:  (-(1-e) log s(beta h) + e log s(-beta h)) / (1 - 2e)
                                                             rDPO, Chowdhury et al. 2024
    IPO's eq. 17 is written with sequence log-probs; train_dpo.py passes length-normalised
    (mean) ones for IPO, as TRL does, so that the target margin 1/(2 beta) is per token
    instead of growing with the response's length.
    Rewards: beta (pi - ref) for the chosen and the rejected answers, detached. The
    reference log-probs are constants: no gradient flows into them.
    """
    ref_margin = (ref_chosen_logps - ref_rejected_logps).detach()
    h = (policy_chosen_logps - policy_rejected_logps) - ref_margin  # [B]
    z, e = beta * h, label_smoothing
    if loss_type == "sigmoid":
        losses = -(1 - e) * F.logsigmoid(z) - e * F.logsigmoid(-z)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - z)
    elif loss_type == "robust":
        losses = (-(1 - e) * F.logsigmoid(z) + e * F.logsigmoid(-z)) / (1 - 2 * e)
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}")
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps).detach()
    return DPOLoss(losses, chosen_rewards, rejected_rewards)


def clamp(x: Tensor, lo: float, hi: float) -> Tensor:
    """torch.clamp(x, lo, hi), whose gradient is 1 strictly inside [lo, hi] and 0 at its
    ends (the minimum-norm subgradient). Recent PyTorch gives torch.clamp this gradient
    (pytorch/pytorch#184574), earlier versions 1 at the ends; spelled out, the
    specification does not depend on the version.
    """
    return torch.where((x > lo) & (x < hi), x, x.clamp(lo, hi).detach())


def ppo_policy_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, clip_eps: float = 0.2
) -> PolicyLoss:
    """PPO's clipped surrogate objective as a loss (Schulman et al. 2017), over [B, T].

        r = exp(logp - old_logp)
        loss = masked_mean(max(-A r, -A clip(r, 1 - eps, 1 + eps)))
        clipfrac = masked_mean([the clipped term is larger]),  approx_kl = masked_mean((logp - old_logp)^2) / 2
    with masked_mean(x) = sum(x m) / max(sum(m), 1). Gradient w.r.t. logprobs only.
    approx_kl is Schulman's k2 estimator, TRL's policy/approxkl; CleanRL logs k3,
    (r - 1) - log r, so the two differ.
    """
    mask = mask.float()
    n = mask.sum().clamp(min=1)
    old_logprobs, advantages = old_logprobs.detach(), advantages.detach()
    ratio = torch.exp(logprobs - old_logprobs)  # [B, T]
    pg_losses = -advantages * ratio
    pg_losses2 = -advantages * clamp(ratio, 1 - clip_eps, 1 + clip_eps)
    loss = (torch.maximum(pg_losses, pg_losses2) * mask).sum() / n
    clipfrac = ((pg_losses2 > pg_losses).float() * mask).sum() / n
    approx_kl = 0.5 * ((logprobs - old_logprobs) ** 2 * mask).sum() / n
    return PolicyLoss(loss, clipfrac.detach(), approx_kl.detach())


def ppo_value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip: float = 0.2) -> ValueLoss:
    """PPO's clipped value loss, over [B, T]: not in the PPO paper, whose value loss is the
    plain squared error, but in OpenAI's implementations (baselines' ppo2,
    lm-human-preferences), and TRL's and CleanRL's after them.

        v_clipped = old + clip(v - old, -c, c)
        loss = masked_mean(max((v - R)^2, (v_clipped - R)^2)) / 2
        clipfrac = masked_mean([(v_clipped - R)^2 > (v - R)^2])
    Gradient w.r.t. values only.
    """
    mask = mask.float()
    n = mask.sum().clamp(min=1)
    old_values, returns = old_values.detach(), returns.detach()
    v_clipped = old_values + clamp(values - old_values, -clip, clip)  # [B, T]
    vf_losses1 = (values - returns) ** 2
    vf_losses2 = (v_clipped - returns) ** 2
    loss = 0.5 * (torch.maximum(vf_losses1, vf_losses2) * mask).sum() / n
    clipfrac = ((vf_losses2 > vf_losses1).float() * mask).sum() / n
    return ValueLoss(loss, clipfrac.detach())


@torch.no_grad()
def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95) -> GAE:
    """Generalised advantage estimation (Schulman et al. 2016) for right-padded [B, T].

    A position whose mask is 0 counts as after the end of its sequence:
        r' = r m,  v' = v m,  v'_T = 0,  A_T = 0
        delta_t = r'_t + gamma v'_{t+1} - v'_t
        A_t = m_t (delta_t + gamma lam A_{t+1}),   returns = A + v'
    A loop over t, vectorised over the batch. No gradient.
    """
    mask = mask.float()
    rewards, values = rewards.float() * mask, values.float() * mask  # [B, T]
    T = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])  # v'_{t+1}, [B]
    next_adv = torch.zeros_like(rewards[:, 0])  # A_{t+1}, [B]
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_adv = mask[:, t] * (delta + gamma * lam * next_adv)
        advantages[:, t] = next_adv
        next_value = values[:, t]
    return GAE(advantages, advantages + values)
