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

from minalign.checkpoint import (check_stage, file_fingerprint, load_checkpoint, remove_unfinished_saves,
                                 replace_earlier_run, weights_fingerprint)
from minalign.cli import ArgumentError, flag, given

# A resumed run's own settings, given or not: the rest, left out, take the checkpoint's values.
NOT_RESUMED = ("resume", "stop_at", "out_dir", "device")

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


def continue_run(args, stage: str, may_change=(), own=NOT_RESUMED, unit: str = "step"):
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


def check_same_model(ckpt: dict, name: str, flag: str, folder, what: str) -> None:
    """Refuse, before any work, to continue a run whose starting model (`name` in its
    fingerprints: "sft", "rm"; `what`: "SFT policy") is not in `folder` (given by `flag`)
    any more, or is another one there."""
    path = Path(folder) / "ckpt.pt"
    if not path.exists():
        raise ArgumentError(f"--resume: {flag} {folder} holds no checkpoint, and the run goes on only from the {what} "
                            f"it started from: pass {flag} and the folder that holds it now")
    check_started_from(ckpt, {name: weights_fingerprint(load_checkpoint(path)["model"])},
                       {name: f"the {what} in {folder}"})


def start_or_resume(ckpt: dict | None, out_dir, dist, model, optimizer, total: int,
                    unit: str = "step") -> tuple[int, float]:
    """(first step, train_seconds so far) of a run of `total` steps about to train, after
    every check: a new run (`ckpt` None) replaces the earlier one in out_dir; a resumed run
    loads the checkpoint's model and optimizer state, and keeps the folder as it is."""
    if ckpt is None:
        replace_earlier_run(out_dir, dist)
        return 1, 0.0
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["resume"]["optimizer"])
    note_saved(out_dir, ckpt["step"], resumable=True, unit=unit, world_size=dist.world_size)
    if dist.is_main:
        done = ": training is done, the final evaluation is left" if ckpt["step"] >= total else ""
        print(f"resumed from {Path(out_dir) / 'ckpt.pt'} at {unit} {ckpt['step']} of {total}{done}")
        remove_unfinished_saves(out_dir)
    return ckpt["step"] + 1, ckpt["resume"]["train_seconds"]


def save_due(step: int, last: int, save_interval: int) -> bool:
    """Whether a run writes a checkpoint to resume from after `step`: every save_interval
    steps, and at `last`, where this invocation stops: at --stop-at, or at the end, before
    the final evaluation, so that --resume finishes an evaluation cut short (the final
    checkpoint, which holds the trained model alone, comes after it)."""
    return step % save_interval == 0 or step == last


def stopped_early(script: str, out_dir, last: int, total: int, unit: str = "step") -> bool:
    """Whether a run stopped by --stop-at (at `last`, before its end) is over; it says
    how to go on. Call on the main process."""
    if last < total:
        print(f"stopped at {unit} {last} of {total}: continue with `python {script} --resume --out-dir {out_dir}`"
              f"{_with_processes(_resumable.get('world_size', 1))}")
    return last < total


# What this process last saved to resume from (or resumed from): for resume_hint
_resumable: dict = {}


def note_saved(out_dir, step: int, resumable: bool, unit: str = "step", world_size: int = 1) -> None:
    """Record that out_dir/ckpt.pt now holds this run's checkpoint at `step`: one that
    --resume goes on from (`resumable`), or the final one."""
    _resumable.clear()
    if resumable:
        _resumable.update(out_dir=str(out_dir), step=step, unit=unit, world_size=world_size)


def resume_hint(args, script: str) -> str:
    """For the line that reports a run stopped by Ctrl-C or SIGTERM: how to go on from the
    last checkpoint it saved or resumed from in its out_dir ("" if none, or the script has
    no --resume). One saved elsewhere, by an upstream stage the script was training for
    it, gets none: the same command goes on with that stage."""
    if not hasattr(args, "resume") or not _resumable:
        return ""
    if Path(_resumable["out_dir"]).resolve() != Path(args.out_dir).resolve():
        return ""
    return (f"; `python {script} --resume --out-dir {_resumable['out_dir']}`"
            f"{_with_processes(_resumable['world_size'])} goes on from its checkpoint at "
            f"{_resumable['unit']} {_resumable['step']}")


def _with_processes(n: int) -> str:
    """What a --resume command needs said of a run in n processes."""
    return f" (under torchrun, with {n} processes)" if n > 1 else ""
