"""Data-parallel training: the same script runs alone or under torchrun.

Under `torchrun --nproc_per_node=N`, each process holds a full model replica, reads a
distinct slice of every global batch, and DistributedDataParallel averages gradients.
Rank 0 alone prints, writes metrics and saves checkpoints.
"""

import os
import re
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from minalign.cli import ArgumentError


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


def setup(device: str = "auto") -> DistInfo:
    """Initialise the process group when launched by torchrun; pick the device.

    `device` "auto" means CUDA when available, else CPU. Backend: nccl on CUDA, gloo on CPU.
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise ArgumentError(f"--device {device!r}: must be auto, cpu, cuda or cuda:N")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ArgumentError(f"--device {device}: no CUDA device is available (torch {torch.__version__})")
    if "RANK" not in os.environ:
        return DistInfo(device=device)
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device.startswith("cuda"):
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
