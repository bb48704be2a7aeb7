"""Time of generalised advantage estimation: minalign's kernel vs Python loops over T.

    python bench/bench_gae.py                  # CPU, B=64, T=512
    python bench/bench_gae.py --device cuda    # B=512, T=4096

"Python loop" is the loop PPO trainers write, as TRL's PPO trainer writes it: values and
rewards masked once, then one step per token launching a few tensor ops, the advantages
collected in a list and stacked. "reference" is minalign.reference.gae, the same loop
with the mask applied at every step. Reported: the median of --reps timed runs after a
warm-up, and the speed-up of the kernel, all wall times per call; on CUDA also the
kernel's own time from the profiler, which leaves out the host's launch overhead.
"""

import statistics
import time
from dataclasses import dataclass

import torch

from machine import describe
from minalign.cli import check_args, parse_args
from minalign.distributed import check_device
from minalign import ops, reference


def python_loop_gae(rewards, values, mask, gamma, lam):
    values = values * mask  # zero after each episode's end, so the loop needs no mask
    rewards = rewards * mask
    T = rewards.shape[1]
    last_gae = 0.0
    advantages_reversed = []
    for t in reversed(range(T)):
        next_values = values[:, t + 1] if t < T - 1 else 0.0
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        last_gae = delta + gamma * lam * last_gae
        advantages_reversed.append(last_gae)
    advantages = torch.stack(advantages_reversed[::-1], dim=1)
    return advantages, advantages + values


def median_ms(fn, device, reps):
    fn()  # warm-up
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def kernel_us(fn, reps):
    """GPU time of the kernels fn launches, per call, from the profiler (None if unavailable).

    Wall time per call also holds the host's work (argument checks, dispatch, the
    launch itself), which is tens of microseconds and hides a kernel this short."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(reps):
                fn()
            torch.cuda.synchronize()
        kernels = [e.time_range.elapsed_us() for e in prof.events() if e.device_type == DeviceType.CUDA]
    except Exception as error:  # a profiler without CUPTI: report what we can
        print(f"profiler unavailable: {type(error).__name__}: {error}")
        return None
    return sum(kernels) / reps if kernels else None


@dataclass
class Args:
    """Time of generalised advantage estimation: minalign's kernel vs Python loops over T."""

    device: str = "cpu"
    """Where to run: "cpu", "cuda" or "cuda:N"."""
    B: int | None = None
    """Rows (None: 64 on cpu, 512 on cuda)."""
    T: int | None = None
    """Tokens per row (None: 512 on cpu, 4096 on cuda)."""
    reps: int = 9
    """Timed runs."""
    threads: int = 2
    """CPU threads (torch.set_num_threads)."""

    def __post_init__(self):
        check_args(self, positive=("B", "T", "reps", "threads"))
        self.device = check_device(self.device)


def main():
    args = parse_args(Args)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    B, T = args.B or (512 if cuda else 64), args.T or (4096 if cuda else 512)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rewards, values = torch.randn(B, T, device=device), torch.randn(B, T, device=device)
    lengths = torch.randint(T // 2, T + 1, (B,), device=device)
    mask = (torch.arange(T, device=device) < lengths[:, None]).float()

    ours = ops.gae(rewards, values, mask, 1.0, 0.95)
    for other in (python_loop_gae(rewards, values, mask, 1.0, 0.95), reference.gae(rewards, values, mask, 1.0, 0.95)):
        torch.testing.assert_close(ours.advantages, other[0], atol=1e-3, rtol=1e-4)

    print(describe(device))
    print(f"\ngae on {device.type}, B={B:,}, T={T:,}, {torch.get_num_threads()} threads, median of {args.reps}")
    rows = {
        "minalign.ops.gae": median_ms(lambda: ops.gae(rewards, values, mask, 1.0, 0.95), device, args.reps),
        "Python loop over T": median_ms(lambda: python_loop_gae(rewards, values, mask, 1.0, 0.95), device, args.reps),
        "minalign.reference.gae": median_ms(lambda: reference.gae(rewards, values, mask, 1.0, 0.95), device, args.reps),
    }
    ours_ms = rows["minalign.ops.gae"]
    print("| implementation | ms | vs minalign |")
    print("| --- | ---: | ---: |")
    for name, ms in rows.items():
        print(f"| {name} | {ms:.3f} | {ms / ours_ms:.1f}x |")
    if cuda:
        us = kernel_us(lambda: ops.gae(rewards, values, mask, 1.0, 0.95), args.reps)
        if us is not None:
            print(f"minalign.ops.gae kernel time alone (profiler, mean of {args.reps}): {us:.1f} us, of "
                  f"{1e3 * ours_ms:.1f} us per call (the rest is the host's work: checks, dispatch, launch)")


if __name__ == "__main__":
    main()
