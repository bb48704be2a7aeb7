"""--resume: a run cut short goes on from its checkpoint as it started.

SFT's checkpoints always hold what a resumed run needs; those of the reward model, DPO
and PPO hold it under "resume" while the run is under way (`save_interval`), and drop
it from the final one, which only the finished model needs.

The checkpoint holds the run's settings. A flag left out takes the checkpoint's value;
a flag given a value other than the checkpoint's is refused (the run would not continue
as it started), unless it is one a run may change on the way (where the output goes,
how often it logs). The data must be the same file, wherever it is now: a checkpoint
holds its bytes' hash.
"""

from dataclasses import fields, replace
from pathlib import Path

from minalign.checkpoint import (check_stage, file_fingerprint, finished, load_checkpoint, remove_unfinished_saves,
                                 replace_earlier_run)
from minalign.cli import ArgumentError, flag, given


def same_setting(name: str, a, b) -> bool:
    """Whether two values of a setting agree (a data file however its path is written)."""
    if name == "data" and a is not None and b is not None:
        return Path(a).resolve() == Path(b).resolve()
    return a == b


def trained_on(ckpt: dict, data_path: str | None) -> bool:
    """Whether a checkpoint was trained on this --data file (None: the built-in task):
    the same bytes wherever the file is now, or, for a checkpoint from before they were
    hashed, the same path."""
    found = ckpt["args"].get("data")
    if data_path is None or found is None:
        return data_path is None and found is None
    if ckpt.get("data_sha256") and Path(data_path).is_file():
        return file_fingerprint(data_path) == ckpt["data_sha256"]
    return Path(data_path).resolve() == Path(found).resolve()


def resumed_args(args, saved: dict, may_change=(), own=()):
    """The settings (a dataclass like `args`) of the run a checkpoint continues, `saved`
    being its args: a field left out takes the saved value, unless it is one of `own`
    (this invocation's, given or not); a field given a value other than the saved one
    raises ArgumentError, unless it is one of `may_change`."""
    names = [f.name for f in fields(args) if f.name in saved]
    changed = [k for k in names if k in given(args) and k not in may_change
               and not same_setting(k, getattr(args, k), saved[k])]
    if changed:
        raise ArgumentError(f"--resume continues the run in {args.out_dir} with its own settings: "
                            + ", ".join(f"{flag(k)} {getattr(args, k)} (it has {saved[k]})" for k in changed))
    resumed = replace(args, **{k: saved[k] for k in names if k not in given(args) and k not in own})
    resumed._given = given(args)  # what the command line named, for the checks that follow
    return resumed


def continue_run(args, stage: str, may_change=(), own=(), unit: str = "step"):
    """(args, checkpoint) of the run that --resume continues in args.out_dir (a stage
    whose checkpoints hold their resume state under "resume"): its settings, by
    resumed_args, and its last checkpoint. Refuses, naming the folder, one with no
    checkpoint, another stage's, a finished run, and a --stop-at it has passed."""
    path = Path(args.out_dir) / "ckpt.pt"
    if not path.exists():
        raise ArgumentError(f"--resume: no checkpoint in {args.out_dir} to continue (is it the run's --out-dir?)")
    ckpt = load_checkpoint(path)
    check_stage(ckpt, path, stage, "--resume")
    if "resume" not in ckpt:
        raise ArgumentError(f"--resume: the run in {args.out_dir} finished at {unit} {ckpt['step']}: nothing is "
                            f"left to train")
    args = resumed_args(args, ckpt["args"], may_change=may_change, own=own)
    if args.stop_at is not None and args.stop_at <= ckpt["step"]:
        raise ArgumentError(f"--stop-at {args.stop_at}: the run in {args.out_dir} is at {unit} {ckpt['step']} "
                            f"already")
    return args, ckpt


def check_started_from(ckpt: dict, found: dict, described: dict) -> None:
    """Refuse to continue a run whose starting point has changed: `found` maps a name
    ("sft", "rm", "pairs") to the fingerprint of what is there now, `described` to what
    that is ("the SFT policy in out/sft"); the checkpoint's "resume" state holds the
    fingerprints the run started from."""
    saved = ckpt["resume"]["started_from"]
    for name, fingerprint in found.items():
        if saved.get(name) != fingerprint:
            differs = "are not those" if name == "pairs" else "is not the one"
            raise ArgumentError(f"--resume: {described[name]} {differs} the run started from (made again since, or "
                                f"other ones): the run goes on only from its own; name where they are now, or "
                                f"start afresh without --resume")


def start_or_resume(ckpt: dict | None, out_dir, dist, model, optimizer, unit: str = "step") -> tuple[int, float]:
    """(first step, train_seconds so far) of a run about to train, after every check: a new
    run (`ckpt` None) replaces the earlier one in out_dir; a resumed run loads the
    checkpoint's model and optimizer state, and keeps the folder as it is."""
    if ckpt is None:
        replace_earlier_run(out_dir, dist)
        return 1, 0.0
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["resume"]["optimizer"])
    if dist.is_main:
        print(f"resumed from {Path(out_dir) / 'ckpt.pt'} at {unit} {ckpt['step']}")
        remove_unfinished_saves(out_dir)
    return ckpt["step"] + 1, ckpt["resume"]["train_seconds"]


def resume_hint(args, script: str) -> str:
    """For the line that reports a run stopped by Ctrl-C or SIGTERM: how to go on from the
    checkpoint it left in args.out_dir, if that is one of a run cut short ("" if not)."""
    out_dir = getattr(args, "out_dir", None)
    path = Path(out_dir or "") / "ckpt.pt"
    if not hasattr(args, "resume") or out_dir is None or not path.is_file():
        return ""
    try:
        ckpt = load_checkpoint(path)
        if finished(ckpt):
            return ""
    except Exception:  # unreadable, or not one of these scripts' checkpoints: no hint
        return ""
    unit = "update" if ckpt.get("stage") == "ppo" else "step"
    return f"; `python {script} --resume --out-dir {out_dir}` goes on from its checkpoint at {unit} {ckpt['step']}"
