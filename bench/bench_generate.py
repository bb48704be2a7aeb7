"""Batched sampling throughput with and without the KV cache.

Without the cache every new token re-runs the model over the whole sequence so far
(quadratic work); with it each step runs one position per row. Prints tokens/s of
both, measured side by side in one run, and their ratio.

    python bench/bench_generate.py                  # batch 16, 8-token prompts, 256 new tokens
    python bench/bench_generate.py --device cuda --n-embd 768 --n-layer 12
"""

import statistics
import time
from dataclasses import dataclass

import torch

from machine import describe
from minalign.cli import ArgumentError, check_args, parse_args
from minalign.distributed import check_device
from minalign.model import GPT, GPTConfig


def time_generate(model, prompts, new_tokens, use_cache, seed):
    gen = torch.Generator(device=prompts.device).manual_seed(seed)
    if prompts.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    tokens, _ = model.generate(prompts, max_new_tokens=new_tokens, use_cache=use_cache, generator=gen)
    if prompts.device.type == "cuda":
        torch.cuda.synchronize()
    assert tokens.shape[1] == new_tokens
    return time.perf_counter() - t0


@dataclass
class Args:
    """Batched sampling throughput with and without the KV cache."""

    batch: int = 16
    """Prompts sampled together."""
    prompt_len: int = 8
    """Tokens of each (random) prompt."""
    new_tokens: int = 256
    """Tokens sampled after each prompt."""
    n_layer: int = 4
    """Transformer blocks of the (randomly initialised) model."""
    n_head: int = 4
    """Attention heads."""
    n_embd: int = 128
    """Width; a multiple of --n-head."""
    vocab_size: int = 1024
    """Vocabulary size."""
    reps: int = 3
    """Timed runs of each variant."""
    threads: int = 2
    """CPU threads (torch.set_num_threads)."""
    device: str = "cpu"
    """Where to run: "cpu", "cuda" or "cuda:N"."""

    def __post_init__(self):
        check_args(self, positive=("batch", "prompt_len", "new_tokens", "n_layer", "n_head", "n_embd", "vocab_size",
                                   "reps", "threads"))
        if self.n_embd % self.n_head:
            raise ArgumentError(f"--n-embd {self.n_embd}: must be a multiple of --n-head {self.n_head}")
        self.device = check_device(self.device)


def main():
    args = parse_args(Args)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = GPTConfig(block_size=args.prompt_len + args.new_tokens, vocab_size=args.vocab_size,
                       n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd)
    model = GPT(config).to(args.device).eval()
    prompts = torch.randint(0, args.vocab_size, (args.batch, args.prompt_len), device=args.device)
    for use_cache in (True, False):  # warm-up
        time_generate(model, prompts, min(8, args.new_tokens), use_cache, 0)
    n = args.batch * args.new_tokens
    times = {True: [], False: []}
    for rep in range(args.reps):  # in turns, so that both see the same machine
        for use_cache in times:
            times[use_cache].append(time_generate(model, prompts, args.new_tokens, use_cache, rep))
    t_cache, t_full = statistics.median(times[True]), statistics.median(times[False])
    print(describe(args.device))
    print(f"device {args.device}, threads {args.threads}, batch {args.batch}, prompt {args.prompt_len}, "
          f"{args.new_tokens} new tokens, model {args.n_layer}x{args.n_embd}, V={args.vocab_size}; "
          f"median of {args.reps}")
    print(f"{'method':<20}{'seconds':>10}{'tokens/s':>12}")
    print(f"{'KV cache':<20}{t_cache:>10.3f}{n / t_cache:>12.0f}")
    print(f"{'full recompute':<20}{t_full:>10.3f}{n / t_full:>12.0f}")
    print(f"speed-up from the cache: {t_full / t_cache:.1f}x")


if __name__ == "__main__":
    main()
