"""Data-parallel training: the same script runs alone or under torchrun.

Under `torchrun --nproc_per_node=N`, each process holds a full model replica, reads a
distinct slice of every global batch, and DistributedDataParallel averages gradients.
Rank 0 alone prints, writes metrics and saves checkpoints. `Batches` says which
examples each process takes at each step.
"""

import os
import random
import re
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from minalign import ops
from minalign.cli import ArgumentError
from minalign.logger import counted


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def check_device(device: str) -> str:
    """The device a --device value names: "auto" (CUDA when available, else CPU), "cpu",
    "cuda" or "cuda:N"; ArgumentError for another value, or for CUDA where there is none."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise ArgumentError(f"--device {device!r}: must be auto, cpu, cuda or cuda:N")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ArgumentError(f"--device {device}: no CUDA device is available (torch {torch.__version__})")
    if device.startswith("cuda:") and int(device[5:]) >= torch.cuda.device_count():
        raise ArgumentError(f"--device {device}: {_cuda_devices()}")
    return device


def _cuda_devices() -> str:
    n = torch.cuda.device_count()
    return "there is only cuda:0" if n == 1 else f"there are {n} CUDA devices, cuda:0 to cuda:{n - 1}"


def setup(device: str = "auto") -> DistInfo:
    """Initialise the process group when launched by torchrun; pick the device.

    `device` as check_device takes it. Backend: nccl on CUDA, gloo on CPU. A
    MINALIGN_CPU_BLOCKS the CPU kernels cannot honour is refused here, before any work.
    """
    device = check_device(device)
    try:
        ops.cpu_kernels()
    except ValueError as error:
        raise ArgumentError(str(error)) from None
    if "RANK" not in os.environ:
        return DistInfo(device=device)
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device.startswith("cuda"):
        if device != "cuda":  # each process has its own device; one named for all would be ignored
            raise ArgumentError(f"--device {device}: under torchrun each process takes cuda:<its LOCAL_RANK>; "
                                f"pass --device cuda (or auto), and CUDA_VISIBLE_DEVICES to choose which")
        if local_rank >= torch.cuda.device_count():
            raise ArgumentError(f"torchrun's process LOCAL_RANK {local_rank} has no CUDA device of its own "
                                f"({_cuda_devices()}): start at most {torch.cuda.device_count()} per node")
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return DistInfo(rank, world_size, local_rank, device)


def cleanup(info: DistInfo) -> None:
    """Tear the process group down once every rank is done (one torn down under a rank
    still evaluating can abort it)."""
    if info.enabled:
        dist.barrier()
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    """Wait for every rank (e.g. until rank 0 has written a file the others read)."""
    if info.enabled:
        dist.barrier()


def on_main(info: DistInfo, fn, *args, **kwargs) -> float:
    """Run fn(*args, **kwargs) on the main process while the others wait (an evaluation,
    say); returns the seconds it took, on every process."""
    start = time.time()
    if info.is_main:
        fn(*args, **kwargs)
    barrier(info)
    return time.time() - start


def all_reduce_sum(x: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum of `x` over all ranks (`x` itself when running alone)."""
    if info.enabled:
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def gather_objects(obj, info: DistInfo) -> list:
    """Every rank's `obj` (picklable), in rank order, on every rank ([obj] alone)."""
    if not info.enabled:
        return [obj]
    objects = [None] * info.world_size
    dist.all_gather_object(objects, obj)
    return objects


def reduce_metrics(metrics: dict, info: DistInfo, lowest=(), highest=(), summed=()) -> dict:
    """Metrics of the whole global batch from each rank's share of it (the shares are of
    equal size): the mean over ranks, but the minimum for the names in `lowest`, the
    maximum for those in `highest` and the sum for the counts in `summed`. Every rank
    must call it, with the same names."""
    if not info.enabled:
        return metrics
    device = info.device if info.device.startswith("cuda") else "cpu"
    averaged = [k for k in metrics if k not in (*lowest, *highest, *summed)]
    out = {}
    for names, op, scale in ((averaged, dist.ReduceOp.SUM, 1 / info.world_size), (summed, dist.ReduceOp.SUM, 1),
                             (lowest, dist.ReduceOp.MIN, 1), (highest, dist.ReduceOp.MAX, 1)):
        if names:
            values = torch.tensor([float(metrics[k]) for k in names], dtype=torch.float64, device=device)
            dist.all_reduce(values, op=op)
            out.update({k: v * scale for k, v in zip(names, values.tolist())})
    return {k: out[k] for k in metrics}


class Batches:
    """Which examples each training step takes, for every process of a DDP run.

    Each epoch is a shuffle of range(n) by (seed, epoch), the same on every rank, cut
    into global batches of batch_size (a short last one is dropped, so every rank
    takes the same steps). Rank r takes batch[r::world_size] of each, so the ranks
    see distinct slices of one global batch. Batches are looked up by step, so a
    resumed run goes on exactly where it stopped.
    """

    def __init__(self, n: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        if batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} is not a multiple of world_size {world_size}")
        if n < batch_size:
            raise ArgumentError(f"--batch-size {batch_size}: only {counted(n, 'example')}, not enough for one batch")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.steps_per_epoch = n // batch_size
        self._epoch, self._order = None, None

    def describe_left_out(self, what: str = "examples") -> str:
        """A note for the run's header: how many examples each epoch's short last batch leaves out."""
        left_out = self.n % self.batch_size
        if not left_out:
            return ""
        return f" ({left_out:,} of the {self.n:,} {what} left out of each epoch, drawn anew each epoch)"

    def order(self, epoch: int) -> list[int]:
        """All example indices in the order of one epoch."""
        if epoch != self._epoch:  # one shuffle per epoch, not per step
            self._order = list(range(self.n))
            # a str seed: the same shuffle in every process and every run
            random.Random(f"{self.seed}:{epoch}").shuffle(self._order)
            self._epoch = epoch
        return self._order

    def indices(self, step: int) -> list[int]:
        """This rank's example indices for a step (steps count from 0, across epochs)."""
        epoch, i = divmod(step, self.steps_per_epoch)
        global_batch = self.order(epoch)[i * self.batch_size:(i + 1) * self.batch_size]
        return global_batch[self.rank::self.world_size]
