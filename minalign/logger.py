"""Progress lines on stdout and metrics appended to `out_dir/metrics.jsonl`."""

import json
import math
import time
from pathlib import Path


class MetricsLogger:
    """Appends one JSON object per call to `out_dir/metrics.jsonl`; silent when disabled
    (the non-zero ranks of a distributed run).

    A new run removes an earlier run's file; its own appears with its first record. A run
    resumed from a checkpoint at `resume_step` keeps the records up to that step and drops
    later ones, which the interrupted run logged after its last checkpoint and the resumed
    run logs again.
    """

    def __init__(self, out_dir, enabled: bool = True, resume_step: int | None = None):
        self.path = Path(out_dir) / "metrics.jsonl"
        self.enabled = enabled
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines() if _step(line) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        else:
            self.path.unlink(missing_ok=True)

    def log(self, step: int, **metrics) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.time(), 3)}
        record.update({k: _plain(v) for k, v in metrics.items()})
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def _step(line: str) -> float:
    """The step of a metrics.jsonl line; infinite for a line that is not a record (one
    torn by a crash mid-write), so that a resume drops it."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def _plain(v):
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf
    return v


class Progress:
    """A one-line status: step (or `unit`), the given metrics, throughput and time left."""

    def __init__(self, total_steps: int, enabled: bool = True, start_step: int = 0, unit: str = "step"):
        self.total = total_steps
        self.unit = unit
        self.enabled = enabled
        self.start = time.time()
        self.start_step = start_step  # a resumed run's first step: the rate counts from there

    def line(self, step: int, **metrics) -> str:
        elapsed = time.time() - self.start
        done = max(step - self.start_step, 1)
        eta = elapsed / done * (self.total - step)
        parts = [f"{self.unit} {step:>5}/{self.total}"]
        for k, v in metrics.items():
            parts.append(f"{k} {v + 0.0:.4g}" if isinstance(v, float) else f"{k} {v}")  # + 0.0: no "-0"
        parts.append(f"elapsed {format_seconds(elapsed)}  eta {format_seconds(eta)}")
        return " | ".join(parts)

    def print(self, step: int, **metrics) -> None:
        if self.enabled:
            print(self.line(step, **metrics), flush=True)


def counted(n: int, noun: str) -> str:
    """'1 step', '2,077 steps': a count and its noun, with an s for any number but one."""
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def format_seconds(s: float) -> str:
    s = int(round(s))
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"
