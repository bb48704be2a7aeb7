"""Seconds per DPO optimizer step: minalign's trainer step against a plain PyTorch one.

The shape of a figure measured with HF TRL 1.16's DPOTrainer on another 2-core CPU
(14.6 s per step, median): a 4-layer, 256-wide GPT with the GPT-2 vocabulary, 8 pairs
per step, up to 256 tokens per sequence (here exactly 256: a 128-token prompt and
128-token responses).

- minalign: one forward over chosen + rejected, fused log-probs (in-place backward),
  ops.dpo_loss, reference log-probs computed once before training (as train_dpo.py).
- plain PyTorch: the same model, optimizer and cached reference log-probs, with
  log_softmax + gather: the kernels' share of the difference.
- plain PyTorch, reference each step: also a forward of the reference model every
  step, as most DPO trainers do (TRL precomputes only when asked to).

The TRL row is that figure, not run here: real HH-RLHF pairs (lengths up to 256,
padded per batch) on another machine, so its ratio is a rough one; it is printed only
at the default shape.

    python bench/bench_dpo_step.py                 # CPU, 2 threads
"""

import copy
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from machine import describe
from minalign import ops
from minalign.cli import check_args, parse_args
from minalign.data import Example, collate_pairs
from minalign.dpo import pair_logps, reference_logps
from minalign.model import GPT, GPTConfig

TRL_SECONDS_PER_STEP = 14.6  # TRL 1.16 DPOTrainer, another 2-core CPU (median), HH-RLHF pairs


def plain_logps(model, input_ids, labels):
    """Summed log-probs of the labelled tokens, the way it is usually written."""
    logits, _ = model(input_ids)  # (2B, T, Vp)
    logp = logits.float().log_softmax(-1)  # (2B, T, Vp): a second full-size tensor
    mask = labels != -100
    picked = logp.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)  # (2B, T)
    return (picked * mask).sum(-1)


@dataclass
class Args:
    """Seconds per DPO optimizer step: minalign's trainer step against a plain PyTorch one (CPU)."""

    pairs: int = 8
    """Preference pairs per step."""
    prompt_len: int = 128
    """Prompt tokens of every pair."""
    response_len: int = 128
    """Tokens of each response."""
    reps: int = 3
    """Timed steps of each variant."""
    threads: int = 2
    """CPU threads (torch.set_num_threads)."""

    def __post_init__(self):
        check_args(self, positive=("pairs", "prompt_len", "response_len", "reps", "threads"))


def main():
    args = parse_args(Args)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    T = args.prompt_len + args.response_len
    config = GPTConfig(block_size=T, vocab_size=50258, n_layer=4, n_head=4, n_embd=256)  # GPT-2's 50,257 + PAD
    policy = GPT(config)
    reference = copy.deepcopy(policy).eval()
    pairs = []
    for _ in range(args.pairs):
        prompt = torch.randint(0, 50257, (args.prompt_len,)).tolist()
        chosen, rejected = (torch.randint(0, 50257, (args.response_len,)).tolist() for _ in range(2))
        pairs.append((Example(prompt + chosen, args.prompt_len), Example(prompt + rejected, args.prompt_len)))
    batch = collate_pairs(pairs, pad_id=50257)
    ref = reference_logps(reference, pairs, pad_id=50257)  # once, before training

    opt_a = torch.optim.AdamW(policy.parameters(), lr=1e-5)
    plain_policy = copy.deepcopy(policy)
    opt_b = torch.optim.AdamW(plain_policy.parameters(), lr=1e-5)

    def minalign_step():
        chosen, rejected = pair_logps(policy, batch)  # (B,) each
        loss = ops.dpo_loss(chosen, rejected, ref[:, 0], ref[:, 1], beta=0.1).losses.mean()
        opt_a.zero_grad(set_to_none=True)
        loss.backward()
        opt_a.step()

    ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])
    labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])

    cached_ref = torch.cat([ref[:, 0], ref[:, 1]])  # (2B,) chosen then rejected, as ids

    def plain_step(ref_each_step):
        logps = plain_logps(plain_policy, ids, labels)
        if ref_each_step:
            with torch.no_grad():
                ref_logps = plain_logps(reference, ids, labels)
        else:
            ref_logps = cached_ref
        B = args.pairs
        h = (logps[:B] - ref_logps[:B]) - (logps[B:] - ref_logps[B:])
        loss = -F.logsigmoid(0.1 * h).mean()
        opt_b.zero_grad(set_to_none=True)
        loss.backward()
        opt_b.step()

    steps = {"minalign (train_dpo.py step)": minalign_step,
             "plain PyTorch (log_softmax + gather)": lambda: plain_step(False),
             "plain PyTorch, reference forward each step": lambda: plain_step(True)}
    times = {name: [] for name in steps}
    for rep in range(args.reps + 1):  # the first round warms up
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            if rep:
                times[name].append(time.perf_counter() - t0)
    print(describe("cpu"))
    print(f"DPO step, CPU {args.threads} threads: 4 layers x 256 wide, V=50,258 (GPT-2's + PAD), {args.pairs} pairs of {T} tokens; "
          f"median of {args.reps}; all but the last take the reference log-probs computed once")
    print("| implementation | s/step | steps/s | vs minalign |\n| --- | ---: | ---: | ---: |")
    ours = statistics.median(times["minalign (train_dpo.py step)"])
    for name, ts in times.items():
        s = statistics.median(ts)
        print(f"| {name} | {s:.2f} | {1 / s:.3f} | {s / ours:.2f}x |")
    if (args.pairs, args.prompt_len, args.response_len) == (8, 128, 128):
        print(f"| HF TRL 1.16 DPOTrainer (measured elsewhere: HH-RLHF pairs up to 256 tokens, another 2-core "
              f"CPU; not run here) | {TRL_SECONDS_PER_STEP:.2f} | {1 / TRL_SECONDS_PER_STEP:.3f} | "
              f"~{TRL_SECONDS_PER_STEP / ours:.1f}x |")


if __name__ == "__main__":
    main()
