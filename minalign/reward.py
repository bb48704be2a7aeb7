"""Reward model: a GPT trunk with a scalar head, trained on preference pairs.

The score of a sequence is a linear function of the trunk's final hidden state at its
last real token (the EOS, unless the response was cut short), so it sees the whole
prompt and response and does not depend on padding. Training uses the Bradley-Terry
model of preferences,

    P(chosen > rejected) = sigmoid(r(chosen) - r(rejected)),

and minimises its negative log-likelihood (Christiano et al. 2017; Ouyang et al. 2022).
After training the scores are normalised to mean 0 and standard deviation 1 over the
training pairs' responses (on the built-in task, samples of the SFT policy; Ziegler et
al. 2019), so that the KL penalty's beta in PPO means the same thing whatever the
reward model's scale.

The same class serves as PPO's critic: `forward(..., per_token=True)` reads the head at
every position (through forward, which DDP's gradient synchronisation needs).
Below it: scoring pairs and sampled responses, and held-out accuracy.
"""

import dataclasses
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from minalign import data
from minalign.model import GPT, GPTConfig, evaluating


class RewardModel(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.trunk = GPT(config)
        self.head = nn.Linear(config.n_embd, 1)
        # weights of standard deviation 1/sqrt(d + 1), bias 0: scores start O(1) (Stiennon et al. 2020)
        nn.init.normal_(self.head.weight, std=1.0 / math.sqrt(config.n_embd + 1))
        nn.init.zeros_(self.head.bias)
        # score normalisation, fitted after training: score = gain * raw + offset
        self.register_buffer("gain", torch.tensor(1.0))
        self.register_buffer("offset", torch.tensor(0.0))

    @classmethod
    def from_policy(cls, policy: GPT, seed: int) -> "RewardModel":
        """A reward model whose trunk starts as a copy of `policy` (e.g. the SFT model),
        its head drawn from `seed` alone: the same model whatever ran before it."""
        with torch.random.fork_rng(devices=[]):  # the global random state is left as it was
            torch.manual_seed(seed)
            model = cls(dataclasses.replace(policy.config))  # its own config: disable_dropout edits it
        model.trunk.load_state_dict(policy.state_dict())
        return model

    def values(self, input_ids, attention_mask=None):
        """Normalised head output at every position [B, T] (the critic's per-token values)."""
        hidden = self.trunk.hidden_states(input_ids, attention_mask)  # (B, T, C)
        raw = self.head(hidden).squeeze(-1).float()  # (B, T)
        return self.gain * raw + self.offset

    def forward(self, input_ids, attention_mask, per_token=False):
        """Score [B] of each sequence, read at its last real token (with per_token, the
        values [B, T] at every position, as PPO's critic).

        attention_mask [B, T] marks real tokens; padding may be on either side.
        """
        values = self.values(input_ids, attention_mask)  # (B, T)
        if per_token:
            return values
        if not attention_mask.bool().any(1).all():
            raise ValueError("RewardModel: a sequence with no real token (its attention_mask row is all False)")
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)  # (T,)
        last = torch.where(attention_mask.bool(), positions, -1).max(1).values  # (B,)
        return values.gather(1, last[:, None]).squeeze(1)

    @torch.no_grad()
    def fit_normalisation(self, scores: torch.Tensor) -> None:
        """Rescale so that `scores`, as the model gives them now, get mean 0 and std 1
        (a second fit refines the first: s' = (gain raw + offset - mean) / std)."""
        mean, std = scores.float().mean().item(), scores.float().std().clamp(min=1e-6).item()
        self.gain.fill_(self.gain.item() / std)
        self.offset.fill_((self.offset.item() - mean) / std)


def bradley_terry_loss(chosen_scores, rejected_scores, margin=None, center_coef=0.0):
    """Per-pair loss -log sigmoid(r_c - r_r - margin) [B], plus an optional centring term.

    `margin` [B] (optional) demands a larger gap for pairs rated more clearly
    (Llama 2, Touvron et al. 2023). `center_coef` > 0 adds coef * (r_c + r_r)^2, which
    keeps scores centred on zero (Eisenstein et al. 2023).
    """
    diff = chosen_scores - rejected_scores
    if margin is not None:
        diff = diff - margin
    loss = -F.logsigmoid(diff)
    if center_coef:
        loss = loss + center_coef * (chosen_scores + rejected_scores) ** 2
    return loss


def pair_scores(model, batch):
    """Scores of the chosen and rejected sequences of a pair batch, in one forward pass."""
    input_ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])  # (2B, T)
    mask = torch.cat([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])  # (2B, T)
    scores = model(input_ids, mask)  # (2B,)
    return scores.chunk(2)


@torch.no_grad()
def score_pairs(model, pairs, pad_id, device, batch_size=64) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores [n] of the chosen and of the rejected sequences of token pairs (as trained on)."""
    chosen, rejected = [], []
    with evaluating(model):
        for start in range(0, len(pairs), batch_size):
            c, r = pair_scores(model, data.collate_pairs(pairs[start : start + batch_size], pad_id, device))
            chosen.append(c)
            rejected.append(r)
    return torch.cat(chosen).cpu(), torch.cat(rejected).cpu()


def accuracy_and_margin(model, pairs, pad_id, device, batch_size=64) -> tuple[float, float]:
    """Share of pairs scored the right way round, and the mean score margin."""
    chosen, rejected = score_pairs(model, pairs, pad_id, device, batch_size)
    return (chosen > rejected).float().mean().item(), (chosen - rejected).mean().item()


@torch.no_grad()
def score_rollouts(model, rollouts) -> torch.Tensor:
    """Scores of sampled responses (rollout.Rollout batches), concatenated: of prompt and
    response tokens as sampled, as PPO scores them (decoding and encoding again could
    give other tokens)."""
    with evaluating(model):
        return torch.cat([model(r.sequences, r.attention_mask) for r in rollouts]).cpu()
