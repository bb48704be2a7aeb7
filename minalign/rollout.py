"""Sampling responses to prompts, and scoring them with a language model's log-probs.

A rollout is a batch of prompts (left-padded) and the responses a policy sampled for
them (right-padded after each row's EOS). PPO, DPO's evaluation and the built-in
task's preference data all start from one.
"""

from dataclasses import dataclass

import torch

from minalign import ops
from minalign.cli import ArgumentError
from minalign.data import IGNORE_INDEX, collate_prompts
from minalign.model import evaluating


@dataclass
class Rollout:
    prompt_ids: torch.Tensor  # (B, P) left-padded
    prompt_mask: torch.Tensor  # (B, P) True on real prompt tokens
    response_ids: torch.Tensor  # (B, N) sampled tokens, PAD after EOS
    response_mask: torch.Tensor  # (B, N) True on response tokens, EOS included

    @property
    def sequences(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids, self.response_ids], 1)  # (B, P + N)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.response_mask], 1)  # (B, P + N)

    def response_texts(self, tokenizer) -> list[str]:
        """Decoded responses, EOS left out."""
        keep = self.response_mask & (self.response_ids != tokenizer.eos_id)
        return [tokenizer.decode(ids[m].tolist()) for ids, m in zip(self.response_ids, keep)]

    def rows(self, idx: torch.Tensor) -> "Rollout":
        """The rollout of the rows `idx` (a minibatch)."""
        return Rollout(self.prompt_ids[idx], self.prompt_mask[idx], self.response_ids[idx], self.response_mask[idx])

    def ended(self, eos_id: int) -> torch.Tensor:
        """(B,) True where the response ended with EOS (it did not run out of room)."""
        return ((self.response_ids == eos_id) & self.response_mask).any(1)


def check_room(block_size: int, tokenizer, prompts: list[str], max_new_tokens: int, flag: str,
               model: str = "the model") -> None:
    """Before any work: the longest prompt and max_new_tokens must fit in a model's block."""
    longest = max(len(tokenizer.encode(p)) for p in prompts)
    if longest + max_new_tokens > block_size:
        room = block_size - longest
        raise ArgumentError(f"{flag} {max_new_tokens}: prompts of up to {longest} tokens leave room for "
                            f"{room} in {model}'s block of {block_size}"
                            + (f": pass {flag} {room} or less" if room > 0 else ""))


@torch.no_grad()
def sample(model, tokenizer, prompts: list[str], max_new_tokens: int, generator=None, **sampling) -> Rollout:
    """Sample one response per prompt (one batch). `sampling`: temperature, top_k, top_p.

    The defaults sample from the full distribution (temperature 1): what KL estimates
    and preference data assume.
    """
    device = model.wte.weight.device
    batch = collate_prompts([tokenizer.encode(p) for p in prompts], tokenizer.pad_id, device)
    with evaluating(model):
        ids, mask = model.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens,
                                   eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id,
                                   generator=generator, **sampling)
    return Rollout(batch["input_ids"], batch["attention_mask"], ids, mask)


def sample_batches(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 64,
                   seed: int = 0, **sampling) -> list[Rollout]:
    """One response per prompt, sampled in batches (one Rollout each) with a seeded generator."""
    device = model.wte.weight.device
    generator = torch.Generator(device=device).manual_seed(seed)
    return [sample(model, tokenizer, prompts[start : start + batch_size], max_new_tokens, generator, **sampling)
            for start in range(0, len(prompts), batch_size)]


def sample_completions(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 64,
                       seed: int = 0, **sampling) -> tuple[list[str], list[bool]]:
    """Response texts for many prompts, sampled in batches with a seeded generator, and
    whether each ended (with EOS, rather than running out of max_new_tokens)."""
    rollouts = sample_batches(model, tokenizer, prompts, max_new_tokens, batch_size, seed, **sampling)
    texts = [text for rollout in rollouts for text in rollout.response_texts(tokenizer)]
    ended = [flag for rollout in rollouts for flag in rollout.ended(tokenizer.eos_id).tolist()]
    return texts, ended


def sample_texts(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 64,
                 seed: int = 0, **sampling) -> list[str]:
    """Response texts for many prompts, sampled in batches with a seeded generator."""
    return sample_completions(model, tokenizer, prompts, max_new_tokens, batch_size, seed, **sampling)[0]


def response_logprobs(model, rollout: Rollout, return_entropy: bool = False, temperature: float = 1.0,
                      inplace_backward: bool = False) -> ops.SequenceLogprobs:
    """log pi(response token | everything before it): token_logps and entropy [B, N] (0
    off the response mask), sum_logps and mean_logps [B], under softmax(logits /
    temperature): pass the temperature the tokens were sampled at, so that PPO's
    ratios and KL penalty are those of the sampling policy.
    inplace_backward: backward writes the gradient over the logits (nothing else reads
    them; see ops.token_logprobs).

    One forward pass over prompt + response; position P-1+j predicts response token j.
    Labels are laid out along the full sequence so the logits stay contiguous.
    """
    B, P = rollout.prompt_ids.shape
    N = rollout.response_ids.shape[1]
    logits, _ = model(rollout.sequences, rollout.attention_mask)  # (B, P+N, Vp)
    if temperature != 1.0:
        logits = logits / temperature
    predicts_response = slice(P - 1, P + N - 1)  # the positions whose next token is a response token
    labels = torch.full((B, P + N), IGNORE_INDEX, dtype=torch.long, device=logits.device)  # (B, P+N)
    labels[:, predicts_response] = rollout.response_ids
    mask = torch.zeros(B, P + N, dtype=torch.bool, device=logits.device)  # (B, P+N)
    mask[:, predicts_response] = rollout.response_mask
    out = ops.sequence_logprobs(logits, labels, mask, return_entropy, inplace_backward)
    entropy = None if out.entropy is None else out.entropy[:, predicts_response]  # (B, N)
    return ops.SequenceLogprobs(out.token_logps[:, predicts_response], out.sum_logps, out.mean_logps, entropy)


def response_values(critic, rollout: Rollout) -> torch.Tensor:
    """A critic's values [B, N] of the states before each response token: position
    P-1+j has seen the prompt and response tokens before j, as in response_logprobs."""
    P, N = rollout.prompt_ids.shape[1], rollout.response_ids.shape[1]
    # through forward, not critic.values: DDP synchronises the gradients of forward calls only
    values = critic(rollout.sequences, rollout.attention_mask, per_token=True)  # (B, P+N)
    return values[:, P - 1 : P + N - 1]
