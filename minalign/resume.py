"""--resume: a run cut short goes on from its checkpoint as it started.

The checkpoint holds the run's settings. A flag left out takes the checkpoint's value;
a flag given a value other than the checkpoint's is refused (the run would not continue
as it started), unless it is one a run may change on the way (where the output goes,
how often it logs). The data must be the same file, wherever it is now: a checkpoint
holds its bytes' hash.
"""

from dataclasses import fields, replace
from pathlib import Path

from minalign.checkpoint import file_fingerprint
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
