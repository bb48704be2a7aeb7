"""AdamW with decoupled weight decay on matrices only, and a warmup + cosine schedule."""

import math

import torch

from minalign.logger import counted


def make_optimizer(model, lr, weight_decay=0.1, betas=(0.9, 0.95), device="cpu"):
    """AdamW; weight decay on 2-D weights (matmuls, embeddings), none on biases and norms."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    fused = str(device).startswith("cuda")
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused)


def cosine_lr(step, max_lr, total_steps, warmup_steps, min_lr_ratio=0.1):
    """Linear warmup to max_lr over `warmup_steps`, then cosine decay to min_lr_ratio * max_lr,
    reached at step `total_steps` (nanoGPT's lr_decay_iters). nanoGPT also trains that
    step; here the last step trained, total_steps - 1, runs just above min_lr."""
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    min_lr = max_lr * min_lr_ratio
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)


def warmup_note(warmup_steps: int, total_steps: int) -> str:
    """A line for a run's header when its warmup outlasts it (the learning rate then rises
    throughout and never reaches its peak); "" when the warmup fits."""
    if warmup_steps <= total_steps:
        return ""
    peak = cosine_lr(total_steps - 1, 1.0, total_steps, warmup_steps)
    return (f"note: --warmup-steps {warmup_steps} outlasts the {counted(total_steps, 'step')}: the learning rate rises "
            f"throughout, to {peak:.0%} of --lr")


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr
