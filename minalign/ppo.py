"""PPO for language models: the pieces between a rollout and the clipped losses.

RLHF's third stage (Ziegler et al. 2019; Stiennon et al. 2020; Ouyang et al. 2022):
the policy samples responses, the reward model scores them, and PPO (Schulman et al.
2017) raises the score while a per-token KL penalty keeps the policy near the
reference (SFT) model. Per response token t the reward is

    r_t = -beta * kl_t               + (score if t is the last response token)
    kl_t = log pi(y_t) - log pi_ref(y_t)

The penalty is always this log ratio (k1): as a reward, its policy gradient
E[grad log pi * kl_t] is the gradient of KL(pi || pi_ref). k3 estimates the KL's value
with less variance, but as a reward its policy gradient is grad KL(pi || pi_ref) -
grad KL(pi_ref || pi), which nearly vanishes near the reference; it only measures.

GAE (gamma 1, lambda 0.95) turns rewards and the critic's values into advantages,
whitened over the real tokens (`advantages_and_returns`).

Under DDP each process holds a share of the rollouts. The means here take an `all_sum`
(a sum over processes, distributed.all_reduce_sum) so that whitening, and every figure
over tokens, is that of the global batch; and `token_share` weighs each process's
token-mean losses so that DDP's average of gradients is the gradient of the global
batch's token mean. N processes then compute what one process would from the same
rollouts (per-process means would weigh the tokens of short responses more, and
per-process whitening would erase the score's differences between processes). The losses are
`ops.ppo_policy_loss` and `ops.ppo_value_loss`; their spec, like GAE's, is a few lines
in minalign/reference.py. This file holds pure functions; train_ppo.py runs the loop.
"""

import torch

from minalign import ops


def kl_estimate(logprobs, ref_logprobs, kind: str = "k1"):
    """Per-token estimate of KL(pi || pi_ref) from samples of pi [B, N].

    k1 = log pi - log pi_ref: unbiased, can be negative per token.
    k3 = (r - 1) - log r with r = pi_ref / pi: unbiased, never negative, lower
    variance (Schulman 2020, "Approximating KL divergence").
    Both estimate the KL's value; only k1 belongs in the reward (see above).
    """
    log_ratio = logprobs - ref_logprobs
    if kind == "k1":
        return log_ratio
    if kind == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"kl estimator must be 'k1' or 'k3', got {kind!r}")


def token_rewards(scores, kl, mask, beta: float):
    """Rewards [B, N]: -beta * kl on every response token, plus the reward-model score
    [B] on each row's last response token (its EOS, if it ended); 0 on padding. The KL-penalised reward of
    Ziegler et al. (2019), per token and with the score at the end as in their code
    (lm-human-preferences) and Stiennon et al. (2020)."""
    mask = mask.float()
    rewards = -beta * kl * mask  # (B, N)
    last = mask.cumsum(1).argmax(1)  # (B,) index of the last real token (first max of the running count)
    rewards[torch.arange(len(scores)), last] += scores
    return rewards


def single_process(x):
    """The sum over processes when there is one: `x` itself."""
    return x


def advantages_and_returns(scores, kl, values, mask, beta: float, gamma: float = 1.0, lam: float = 0.95,
                           all_sum=single_process):
    """PPO's targets for one rollout, [B, N] each: the rewards above (scores [B], the
    per-token penalty kl [B, N]), GAE over the critic's values, and the advantages
    whitened over the real tokens (of every process, with `all_sum`); the returns are
    the critic's targets."""
    rewards = token_rewards(scores, kl, mask, beta)  # (B, N)
    advantages, returns = ops.gae(rewards, values, mask, gamma, lam)  # (B, N) each
    return masked_whiten(advantages, mask, all_sum=all_sum), returns


def masked_mean(x, mask, all_sum=single_process):
    """The mean of x over the positions where mask is true (0 when there are none); with
    `all_sum`, over those of every process."""
    mask = mask.float()
    return all_sum((x * mask).sum()) / all_sum(mask.sum()).clamp(min=1)


def masked_whiten(x, mask, eps: float = 1e-8, all_sum=single_process):
    """(x - mean) / std over the positions where mask is true (of every process, with
    `all_sum`); 0 on the others. PPO implementations normalise advantages this way
    (OpenAI's baselines; studied by Andrychowicz et al. 2021; on by default in CleanRL, per
    minibatch, and TRL, per rollout batch of each process); minalign does it per rollout
    batch, over every process."""
    mean = masked_mean(x, mask, all_sum)
    var = masked_mean((x - mean) ** 2, mask, all_sum)
    return (x - mean) * torch.rsqrt(var + eps) * mask.float()


def token_share(mask, world_size: int = 1, all_sum=single_process) -> float:
    """world_size * (this process's real tokens) / (every process's): the factor on a
    process's token-mean loss (or figure) that makes DDP's average over processes the
    mean over every real token of the global batch. 1 for a process alone."""
    n = mask.float().sum()
    return (world_size * n / all_sum(n).clamp(min=1)).item()


def explained_variance(values, returns, mask, all_sum=single_process) -> float:
    """1 - Var(returns - values) / Var(returns) over real tokens (of every process, with
    `all_sum`): 1 is a perfect critic, 0 no better than a constant, negative worse
    (CleanRL's losses/explained_variance)."""
    var_returns = masked_mean((returns - masked_mean(returns, mask, all_sum)) ** 2, mask, all_sum)
    residual = returns - values
    var_residual = masked_mean((residual - masked_mean(residual, mask, all_sum)) ** 2, mask, all_sum)
    return (1 - var_residual / var_returns.clamp(min=1e-8)).item()


class AdaptiveKLController:
    """Ziegler et al. (2019)'s controller: move beta so the KL drifts toward a target,

        beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n_samples / horizon),

    n_samples being the rollouts since the last update. With target None, beta stays fixed."""

    def __init__(self, beta: float, target: float | None = None, horizon: int = 10_000):
        self.value, self.target, self.horizon = beta, target, horizon

    def update(self, kl: float, n_samples: int) -> None:
        if self.target is None:
            return
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_samples / self.horizon
