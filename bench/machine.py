"""The first line every benchmark prints: what the figures below it were measured on."""

import os
import platform

import torch

from minalign import ops


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe(device) -> str:
    """CPU (or GPU) model, threads, torch version and which minalign kernels are built."""
    parts = [f"CPU {cpu_model()} ({os.cpu_count()} visible, {torch.get_num_threads()} torch threads)"]
    if torch.device(device).type == "cuda":
        props = torch.cuda.get_device_properties(device)
        parts.insert(0, f"GPU {props.name} ({props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda})")
    parts.append(f"torch {torch.__version__}")
    parts.append(f"minalign extension {ops.HAS_EXTENSION} (CPU kernels {ops.cpu_kernels()}, "
                 f"CUDA kernels {ops.HAS_CUDA_KERNELS})")
    return "machine: " + "; ".join(parts)
