"""Time and memory of log p(label) per row, forward + backward: minalign vs what users write instead.

    python bench/bench_logprobs.py                         # CPU, float32, N=2048, V=50257
    python bench/bench_logprobs.py --device cuda           # bfloat16, N=16384, V=50257 and 128256

Each implementation maps logits [N, V] (a leaf that requires grad) and labels [N] to
log-probs [N], then backpropagates a fixed upstream gradient. Reported: the median of
--reps timed runs after a warm-up (the implementations take turns), the forward alone (no grad), and the peak memory
above the inputs during forward + backward (the [N, V] gradient included, which every
implementation must produce). CPU memory is the peak resident set size (VmHWM, reset
through /proc/self/clear_refs) minus the size before; CUDA memory is
torch.cuda.max_memory_allocated.

minalign runs three times: as is; with inplace_backward=True, which writes the gradient
over the logits; and as weighted_logprob_sum with the upstream gradient as its weights,
which computes the same gradient (up to rounding) during the forward pass (possible when, as for SFT's
cross-entropy, the weights are known before the forward). The last two refuse a leaf,
so they get, untimed before each run, a fresh copy of the logits that is not a leaf
(as a model's last layer would give it). Their forward alone is token_logprobs's.
On CUDA, weighted_logprob_sum also runs with other amounts of each row kept in shared
memory (--fused-cache-kb, through MINALIGN_FUSED_CACHE_KB): the knob of its kernel.

The roofline is one read and one write of the logits (what a fused forward + backward
needs), measured as an in-place OR with 0 of their bits in memory already written once
(each element read and written back), beside a plain read (an integer max), timed in
turns with the implementations. The probes are plain PyTorch ops, not tuned stream loops, so a kernel
can beat them (a fraction above 1). Writing into a new allocation is slower (on the CPU
each new page faults on its first write); implementations that return a new [N, V]
gradient pay that on top.
"""

import os
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from machine import describe
from minalign.cli import check_args, parse_args
from minalign.distributed import check_device
from minalign import ops


def minalign_inplace(logits, labels):
    return ops.token_logprobs(logits, labels, inplace_backward=True)


def minalign_fused(logits, labels, grad=None):
    """With grad: sum(grad * logprobs), whose gradient is the others' backward(grad)."""
    if grad is None or not torch.is_grad_enabled():
        return ops.token_logprobs(logits, labels)
    return ops.weighted_logprob_sum(logits, labels, grad)


def minalign_fused_cached(kb):
    """minalign_fused with MINALIGN_FUSED_CACHE_KB=kb: the KB of each row its CUDA kernel keeps on chip."""

    def fn(logits, labels, grad=None):
        os.environ["MINALIGN_FUSED_CACHE_KB"] = str(kb)
        try:
            return minalign_fused(logits, labels, grad)
        finally:
            del os.environ["MINALIGN_FUSED_CACHE_KB"]

    fn.weights_are_grad = True
    return fn


minalign_fused.weights_are_grad = True  # forward_backward passes it the upstream gradient


class _ModelOutput(torch.autograd.Function):
    """A written copy of the logits that is not a leaf; its gradient is left where backward writes it."""

    @staticmethod
    def forward(ctx, logits):
        return logits.detach().clone()

    @staticmethod
    def backward(ctx, grad):
        return None


def log_softmax_gather(logits, labels):
    return logits.float().log_softmax(-1).gather(-1, labels[:, None])[:, 0]


def cross_entropy(logits, labels):
    return -F.cross_entropy(logits, labels, reduction="none")


@torch.compile(dynamic=False)  # a kernel specialised to each V, as a user with one model gets
def compiled_gather_minus_logsumexp(logits, labels):
    logits = logits.float()
    return logits.gather(-1, labels[:, None])[:, 0] - torch.logsumexp(logits, -1)


IMPLEMENTATIONS = {
    "minalign.ops.token_logprobs": ops.token_logprobs,
    "minalign, inplace_backward=True": minalign_inplace,
    "minalign.ops.weighted_logprob_sum": minalign_fused,
    "log_softmax + gather": log_softmax_gather,
    "F.cross_entropy(reduction='none')": cross_entropy,
    "torch.compile(gather - logsumexp)": compiled_gather_minus_logsumexp,
}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def rss_bytes(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


class PeakMemory:
    """Peak bytes allocated above the level at entry (None where it cannot be measured)."""

    def __init__(self, device):
        self.device, self.peak = device, None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # resets VmHWM (peak RSS) to the current RSS
                self.start = rss_bytes("VmRSS")
            except OSError:
                self.start = None
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated() - self.start
        elif self.start is not None:
            self.peak = rss_bytes("VmHWM") - self.start


# How each implementation gets its logits (untimed): the leaf itself, unless listed here.
PREPARE = {"minalign, inplace_backward=True": _ModelOutput.apply, "minalign.ops.weighted_logprob_sum": _ModelOutput.apply}


def prepare(name, logits):
    logits.grad = None
    return PREPARE[name](logits) if name in PREPARE else logits


def forward_backward(fn, logits, labels, grad):
    if getattr(fn, "weights_are_grad", False):
        fn(logits, labels, grad).backward()
    else:
        fn(logits, labels).backward(grad)


def median_ms(fn, device, reps):
    times = []
    for _ in range(reps):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def bits(x):
    return x.view({4: torch.int32, 2: torch.int16}[x.element_size()])


# Memory probes on the logits' bits (integer ops: no float conversion can slow them): a
# max reads them; an in-place OR with 0 reads and writes back memory already written once.
PROBES = {"read": lambda x, y: bits(x).amax(), "read+write": lambda x, y: bits(y).bitwise_or_(0)}


def run(device, dtype, N, V, reps):
    torch.manual_seed(0)
    logits = torch.randn(N, V, device=device, dtype=dtype).requires_grad_()
    labels = torch.randint(0, V, (N,), device=device)
    grad = torch.randn(N, device=device)
    nbytes = N * V * logits.element_size()
    print(f"\n{device.type} {str(dtype).replace('torch.', '')} N={N:,} V={V:,}: logits {nbytes / 2**20:,.0f} MiB, "
          f"{torch.get_num_threads()} threads")
    written = torch.empty_like(logits.detach())
    written.fill_(0)  # touch its pages once
    # Warm up (and compile) each, then time them in turns, so that all see the same
    # machine: on a shared machine the load drifts during a run.
    fns = {}
    for name, fn in IMPLEMENTATIONS.items():
        try:
            forward_backward(fn, prepare(name, logits), labels, grad)
            with torch.no_grad():  # torch.compile compiles this one apart
                fn(logits, labels)
            fns[name] = fn
        except Exception as error:  # e.g. out of memory: report it and go on
            print(f"  {name} failed: {type(error).__name__}: {str(error)[:120]}")
        logits.grad = None
    fwd_times, times = {name: [] for name in fns}, {name: [] for name in fns}
    probe_times = {name: [] for name in PROBES}
    for _ in range(reps):
        for name, probe in PROBES.items():
            probe_times[name].append(median_ms(lambda w=written: probe(logits.detach(), w), device, 1))
        for name, fn in fns.items():
            with torch.no_grad():
                fwd_times[name].append(median_ms(lambda: fn(logits, labels), device, 1))
            x = prepare(name, logits)
            times[name].append(median_ms(lambda x=x: forward_backward(fn, x, labels, grad), device, 1))
            del x  # before the next copy is made
            logits.grad = None
    rows = []
    for name, fn in fns.items():
        x = prepare(name, logits)
        with PeakMemory(device) as mem:
            forward_backward(fn, x, labels, grad)
        del x
        logits.grad = None
        rows.append((name, statistics.median(fwd_times[name]), statistics.median(times[name]), mem.peak))
    del written
    read_ms, roofline_ms = (statistics.median(probe_times[name]) for name in ("read", "read+write"))
    print(f"read {read_ms:.1f} ms ({nbytes / read_ms / 1e6:.1f} GB/s); roofline, one read + one write of the logits "
          f"in place: {roofline_ms:.1f} ms ({2 * nbytes / roofline_ms / 1e6:.1f} GB/s read and written); a forward, "
          f"then a backward that reads the logits again: {roofline_ms + read_ms:.1f} ms")
    ours = {name: ms for name, _, ms, _ in rows if name.startswith("minalign")}
    inplace, fused = ours.get("minalign, inplace_backward=True"), ours.get("minalign.ops.weighted_logprob_sum")
    ratio = lambda ms, base: "n/a" if base is None else f"{ms / base:.2f}x"
    print("| implementation | forward ms | fwd+bwd ms | vs minalign in-place | vs weighted_logprob_sum | "
          "roofline fraction | peak extra MiB |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, fwd_ms, ms, peak in rows:
        mem = "n/a" if peak is None else f"{peak / 2**20:,.0f}"
        print(f"| {name} | {fwd_ms:.1f} | {ms:.1f} | {ratio(ms, inplace)} | {ratio(ms, fused)} | "
              f"{roofline_ms / ms:.2f} | {mem} |")

@dataclass
class Args:
    """Time and memory of log p(label) per row, forward + backward: minalign vs what users write instead."""

    device: str = "cpu"
    """Where to run: "cpu", "cuda" or "cuda:N"."""
    dtype: str | None = None
    """Logits dtype: float32, bfloat16 or float16 (None: float32 on cpu, bfloat16 on cuda)."""
    N: int | None = None
    """Rows (None: 2048 on cpu, 16384 on cuda)."""
    V: tuple[int, ...] | None = None
    """Vocabulary sizes, a table each (None: 50257 on cpu; 50257 and 128256 on cuda)."""
    reps: int | None = None
    """Timed runs (None: 5 on cpu, 20 on cuda)."""
    threads: int = 2
    """CPU threads (torch.set_num_threads)."""
    fused_cache_kb: tuple[int, ...] | None = None
    """CUDA: also run weighted_logprob_sum keeping this many KB of each row in shared memory
    (None: 0 and 200; the flag alone: no extra runs; the kernel's own choice runs anyway)."""

    def __post_init__(self):
        check_args(self, positive=("N", "V", "reps", "threads"), non_negative=("fused_cache_kb",),
                   choices={"dtype": (None, "float32", "bfloat16", "float16")})
        self.device = check_device(self.device)


def main():
    args = parse_args(Args)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    cache_kbs = [] if not cuda else [0, 200] if args.fused_cache_kb is None else args.fused_cache_kb
    for kb in cache_kbs:
        name = f"minalign.ops.weighted_logprob_sum, MINALIGN_FUSED_CACHE_KB={kb}"
        IMPLEMENTATIONS[name] = minalign_fused_cached(kb)
        PREPARE[name] = _ModelOutput.apply
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    torch.set_num_threads(args.threads)
    print(describe(device))
    for V in args.V or ([50257, 128256] if cuda else [50257]):
        run(device, dtype, args.N or (16384 if cuda else 2048), V, args.reps or (20 if cuda else 5))


if __name__ == "__main__":
    main()
