"""Evaluate a policy on held-out prompts against the reference (SFT) policy.

Gold reward and KL are the axes of the DPO paper's IMDb experiment (Rafailov et al.
2023, fig. 2 left); win rate is its measure for summaries (fig. 2 right, judged there by
GPT-4), here under the gold judge:

- gold reward: the gold judge's mean score of the policy's samples;
- win rate: how often the policy's sample beats the reference's sample for the same
  prompt under the gold judge (a tie counts one half);
- KL: the sequence-level KL(pi || pi_ref), estimated from the policy's own samples as
  the mean over samples of sum_t [log pi(y_t | x, y_<t) - log pi_ref(y_t | x, y_<t)];
- response length in tokens (EOS included), since optimising a reward often changes it;
- optionally a reward model's mean score of the same samples: beside the gold reward
  it shows whether the policy pleases the proxy more than the judge (reward hacking).

Both policies sample from the full distribution at one temperature (1 unless a PPO
run trained at another), and the KL is that of the distributions sampled, as its
estimate assumes. Each mean over prompts comes with its standard error (`_stderr`,
std / sqrt(n)): two policies' figures that differ by less than about twice it are
within the noise of the prompts drawn.
"""

import json
import math
from pathlib import Path

import torch

from minalign import task
from minalign.model import evaluating
from minalign.rollout import response_logprobs, sample


def stderr(x: torch.Tensor) -> float:
    """Standard error of the mean of x [n]: its sample standard deviation / sqrt(n)."""
    return x.float().std().item() / len(x) ** 0.5 if len(x) > 1 else float("nan")


def held_out_prompts(tokenizer, n: int, seed: int) -> list[str]:
    """The built-in task's evaluation prompts: n openings of test-split reviews, the
    same for every script given the same seed, so their tables compare."""
    return task.prompts("test", tokenizer, n=n, seed=seed + 11)  # + 11: a draw apart from the pairs' (+ 1)


@torch.no_grad()
def evaluate_policy(policy, reference, tokenizer, prompts, max_new_tokens, batch_size=64, seed=0,
                    judge=task.gold_reward, reward_model=None, temperature: float = 1.0) -> dict:
    """Gold reward, win rate and KL of `policy` against `reference` on `prompts`
    (and `reward_model`'s mean score of the policy's samples, when given), both
    sampling, and the KL taken, at `temperature`.

    Returns a dict of the summary figures plus the per-sample "samples" (prompt,
    policy response, reference response and their gold scores)."""
    device = policy.wte.weight.device
    policy_gen = torch.Generator(device=device).manual_seed(seed)
    ref_gen = torch.Generator(device=device).manual_seed(seed + 1)
    kls, lengths, ref_lengths, policy_texts, ref_texts, rm_scores = [], [], [], [], [], []
    models = [m for m in (policy, reference, reward_model) if m is not None]
    with evaluating(*models):  # all without dropout: identical models give KL 0
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            rollout = sample(policy, tokenizer, chunk, max_new_tokens, policy_gen, temperature=temperature)
            logp = response_logprobs(policy, rollout, temperature=temperature).sum_logps  # (B,)
            ref_logp = response_logprobs(reference, rollout, temperature=temperature).sum_logps  # (B,)
            kls.append(logp - ref_logp)
            lengths.append(rollout.response_mask.sum(1).float())
            policy_texts += rollout.response_texts(tokenizer)
            if reward_model is not None:
                rm_scores.append(reward_model(rollout.sequences, rollout.attention_mask).float())
            ref_rollout = sample(reference, tokenizer, chunk, max_new_tokens, ref_gen, temperature=temperature)
            ref_lengths.append(ref_rollout.response_mask.sum(1).float())
            ref_texts += ref_rollout.response_texts(tokenizer)
    gold = torch.tensor(judge([p + r for p, r in zip(prompts, policy_texts)]))
    ref_gold = torch.tensor(judge([p + r for p, r in zip(prompts, ref_texts)]))
    wins = (gold > ref_gold).float() + 0.5 * (gold == ref_gold).float()  # (n,)
    kls = torch.cat(kls).cpu()  # (n,)
    rm = torch.cat(rm_scores).cpu().tolist() if rm_scores else [None] * len(prompts)
    extra = {"rm_score": sum(rm) / len(rm)} if rm_scores else {}
    return {**extra,
        "gold_reward": gold.mean().item(),
        "gold_reward_stderr": stderr(gold),
        "ref_gold_reward": ref_gold.mean().item(),
        "win_rate": wins.mean().item(),
        "win_rate_stderr": stderr(wins),
        "kl": kls.mean().item(),
        "kl_stderr": stderr(kls),
        "response_length": torch.cat(lengths).mean().item(),
        "ref_response_length": torch.cat(ref_lengths).mean().item(),
        "n_prompts": len(prompts),
        "temperature": temperature,
        "samples": [
            {"prompt": p, "response": r, "gold": g, "rm_score": s, "kl": k, "ref_response": rr, "ref_gold": rg}
            for p, r, g, s, k, rr, rg in zip(prompts, policy_texts, gold.tolist(), rm, kls.tolist(), ref_texts,
                                             ref_gold.tolist())
        ],
    }


def format_table(name: str, result: dict) -> str:
    """The evaluation as a small table: the reference policy, then the trained one and
    its figures' standard errors."""
    header = f"{'policy':<10}{'gold reward':>13}{'win rate':>10}{'KL (nats)':>11}{'length':>8}"
    ref = f"{'SFT':<10}{result['ref_gold_reward']:>13.3f}{0.5:>10.3f}{0.0:>11.2f}{result['ref_response_length']:>8.1f}"
    ours = (f"{name:<10}{result['gold_reward']:>13.3f}{result['win_rate']:>10.3f}"
            f"{result['kl']:>11.2f}{result['response_length']:>8.1f}")
    sampled = "" if result.get("temperature", 1.0) == 1.0 else f", sampled at temperature {result['temperature']:g}"
    errors = (f"{'  +- s.e.':<10}{result['gold_reward_stderr']:>13.3f}{result['win_rate_stderr']:>10.3f}"
              f"{result['kl_stderr']:>11.2f}")  # of the trained policy's means over the prompts
    return "\n".join([f"held-out prompts: {result['n_prompts']}{sampled}", header, ref, ours, errors])


def format_samples(name: str, result: dict, n: int = 3) -> str:
    """The first n prompts with the reference's and the policy's responses, gold-scored."""
    return "\n".join(f"  prompt {s['prompt']!r}\n    SFT ({s['ref_gold']:+.2f}): {s['ref_response']!r}"
                     f"\n    {name} ({s['gold']:+.2f}): {s['response']!r}" for s in result["samples"][:n])


def eval_metrics(result: dict) -> dict:
    """An evaluation's figures as metrics.jsonl logs them: eval/<name>, samples left out."""
    return {f"eval/{k}": v for k, v in result.items() if k != "samples"}


def write_eval(out_dir, result: dict) -> Path:
    """`result` to out_dir/eval.json; a figure that is not finite (the standard error of
    one prompt's figures) written as a string, as metrics.jsonl writes it: JSON has no NaN."""
    path = Path(out_dir) / "eval.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    plain = {k: str(v) if isinstance(v, float) and not math.isfinite(v) else v for k, v in result.items()}
    path.write_text(json.dumps(plain, indent=1))
    return path
