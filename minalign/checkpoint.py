"""Checkpoints: one plain dict per file, written atomically, read with weights_only=True.

A checkpoint holds the model's weights and config, the run's arguments, its step, the
tokenizer's name and the stage that wrote it ("sft", "rm", "dpo", "ppo": a folder is
never read or written as another stage's); an SFT checkpoint also holds what
`--resume` needs to continue bit for bit, the optimizer and RNG state, and a hash of
its --data file (a changed file cannot be continued); those the reward model, DPO
and PPO write along a run hold theirs under "resume" (minalign/resume.py). Writing
to a temporary file and renaming it means a crash mid-write never leaves a torn
checkpoint behind; `weights_only=True` means loading one never runs pickled code.
"""

import hashlib
import os
import tempfile
from pathlib import Path

import torch

from minalign import distributed
from minalign.cli import ArgumentError, Diverged, flag as flag_name


def save_checkpoint(path, checkpoint: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp made it private; give it the mode open() gives
        os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the new one
    except BaseException:
        os.unlink(tmp)
        raise


def load_checkpoint(path, map_location="cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except (PermissionError, MemoryError):
        raise  # the file may not be read, or the machine is short of memory
    except Exception as error:  # truncated, not a torch file, or objects that need unpickling code
        text = str(error)
        if "Unsupported global" in text or "Unsupported class" in text:
            raise ArgumentError(f"{path} holds Python objects besides tensors and plain values, which "
                                f"loading with weights_only=True refuses (it never runs pickled code)") from None
        lines = text.splitlines() or [""]  # torch's own reason, without its advice on weights_only
        reason = next((line.split(":", 1)[1] for line in lines if line.startswith("WeightsUnpickler error")),
                      lines[0])
        raise UnreadableCheckpoint(f"{path} is not a readable checkpoint: truncated, or not written by torch.save "
                                   f"({type(error).__name__}: {reason.strip().split('. ')[0][:160]})") from None


class UnreadableCheckpoint(ArgumentError):
    """A ckpt.pt that torch.load cannot read (truncated, or another kind of file)."""


STAGES = {"sft": "an SFT policy", "rm": "a reward model", "dpo": "a DPO policy", "ppo": "a PPO policy"}


def _legacy_stage(ckpt: dict) -> str | None:
    """The stage of a checkpoint written before checkpoints recorded it, from a flag only
    that stage has."""
    if ckpt.get("kind") == "reward":
        return "rm"
    for stage, only_flag in (("sft", "max_steps"), ("dpo", "loss_type"), ("ppo", "kl_coef")):
        if only_flag in ckpt["args"]:
            return stage
    return None


def check_stage(ckpt: dict, path, stage: str, flag: str) -> None:
    """Refuse, naming the flag, a checkpoint that another stage wrote (a reward model where
    the SFT policy belongs, say), before anything is built on it."""
    if not isinstance(ckpt, dict) or not {"model", "model_config", "args"} <= ckpt.keys():
        raise ArgumentError(f"{flag}: {path} is not a checkpoint of these scripts (no model, model_config, args)")
    found = ckpt.get("stage") or _legacy_stage(ckpt)
    if found != stage:
        what = STAGES.get(found, "a model of unknown stage")
        raise ArgumentError(f"{flag}: {path} holds {what}, not {STAGES[stage]}")


def load_model(path, device="cpu", tokenizer=None, max_length: int | None = None):
    """(model, checkpoint) from a checkpoint holding "model" and "model_config": a GPT,
    or a RewardModel when the checkpoint says kind "reward". Given the run's `tokenizer`
    (and `max_length`), the model must have been trained with it (and have room for
    that many tokens), or ArgumentError says what to pass instead."""
    from minalign.model import GPT, GPTConfig
    from minalign.reward import RewardModel

    ckpt = load_checkpoint(path)
    if tokenizer is not None and ckpt.get("tokenizer", tokenizer.name) != tokenizer.name:
        raise ArgumentError(f"{path} was trained with tokenizer {ckpt['tokenizer']!r}, not {tokenizer.name!r}: "
                            f"pass --tokenizer {ckpt['tokenizer']} or another checkpoint folder")
    try:
        config = GPTConfig(**ckpt["model_config"])
    except (KeyError, TypeError, ValueError) as error:  # none, or a field these scripts do not know
        raise ArgumentError(f"{path}: no model_config these scripts can read ({type(error).__name__}: {error}): "
                            f"damaged, or not written by these scripts") from None
    if max_length is not None and max_length > config.block_size:
        raise ArgumentError(f"--max-length {max_length} exceeds the block size {config.block_size} of the model in "
                            f"{path}: pass --max-length {config.block_size} or less, or another checkpoint folder")
    model = (RewardModel if ckpt.get("kind") == "reward" else GPT)(config)
    try:
        model.load_state_dict(ckpt["model"])
    except (KeyError, RuntimeError) as error:  # no weights; missing, unexpected or misshapen ones
        reason = " ".join(str(error).split())[:200]
        raise ArgumentError(f"{path}: its weights and model_config do not fit together ({reason}): damaged, "
                            f"or not written by these scripts") from None
    return model.to(device), ckpt


def block_size_of(folder, default: int) -> int:
    """The block size of the model in folder/ckpt.pt, or `default` (that of the model
    that would be trained there) when the folder holds none, or a file that is no
    checkpoint of these scripts (the check of its stage refuses that one, naming it)."""
    path = Path(folder) / "ckpt.pt"
    config = load_checkpoint(path).get("model_config") if path.exists() else None
    return config["block_size"] if isinstance(config, dict) and "block_size" in config else default


def weights_fingerprint(model) -> str:
    """A short hash of a model's weights (a module, or a state dict), to tell which model
    made a cached result."""
    state = model.state_dict() if hasattr(model, "state_dict") else model
    digest = hashlib.sha256()
    for name, tensor in sorted(state.items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def file_fingerprint(path) -> str:
    """A short hash of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def rng_state() -> dict:
    """Torch RNG state (CPU, and CUDA when present): all the randomness a run draws."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def finished(ckpt: dict) -> bool:
    """Whether no run writes this checkpoint again: every one but that of a run cut short
    (which `--resume`, or for SFT a later stage, finishes in its folder): an SFT one short
    of its steps, or another stage's that holds the state to resume from."""
    if "resume" in ckpt:
        return False
    if (ckpt.get("stage") or _legacy_stage(ckpt)) != "sft":
        return True
    if "step" not in ckpt or "max_steps" not in ckpt["args"]:
        return True  # a policy made elsewhere: taken as it is
    return ckpt["step"] >= ckpt["args"]["max_steps"]


def check_out_dir(path, flag: str = "--out-dir", stage: str | None = None, read_finished: bool = False) -> None:
    """Refuse, naming the flag, before any work, an output folder that cannot be written,
    or whose checkpoint another stage wrote (a reward model is never saved over the SFT
    policy it came from). With `read_finished`, for a folder a later stage makes only
    when it is missing (--sft-dir, --rm-dir), a finished checkpoint there is only read,
    so the folder need not be writable. The folder is made by what first writes there,
    so a run refused later leaves none behind."""
    if not str(path).strip():
        raise ArgumentError(f"{flag} {str(path)!r}: empty; name a folder")
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ArgumentError(f"{flag} {path}: a file, not a folder")
    if stage is not None and (path / "ckpt.pt").exists():
        try:
            ckpt = load_checkpoint(path / "ckpt.pt")
            check_stage(ckpt, path / "ckpt.pt", stage, f"{flag} {path}")
        except ArgumentError as error:
            remedy = "; remove it, or name another folder" if isinstance(error, UnreadableCheckpoint) else ""
            raise ArgumentError((str(error) if str(error).startswith(flag) else f"{flag} {path}: {error}")
                                + remedy) from None
        if read_finished and finished(ckpt):
            return
    existing = path
    while not existing.exists():  # the nearest folder that is there: the rest can be made in it
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise NotADirectoryError(f"{existing} is a file")
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise ArgumentError(f"{flag} {path}: cannot write there ({error.strerror or error})") from None


def replace_earlier_run(out_dir, dist) -> None:
    """A new run in a folder that holds an earlier run's checkpoint or evaluation replaces
    that run: both are removed (by the main process, saying so) as training starts, after
    every check, so that a run interrupted later never leaves its metrics beside another
    run's checkpoint. What else is there (an SFT policy's data made from pairs) stays.
    `dist` is the run's DistInfo: every process has checked the folder before it changes."""
    distributed.barrier(dist)
    earlier = [Path(out_dir) / name for name in ("ckpt.pt", "eval.json") if (Path(out_dir) / name).exists()]
    if dist.is_main and earlier:
        print(f"replacing the earlier run in {out_dir}: removed {', '.join(p.name for p in earlier)}")
        for path in earlier:
            path.unlink()
    if dist.is_main:
        remove_unfinished_saves(out_dir)


def remove_unfinished_saves(out_dir) -> None:
    """Remove what a save cut off by kill -9 (or a power cut) left: its temporary file,
    which save_checkpoint would otherwise have renamed or removed. Called as a run starts
    in out_dir, when no other save can be under way there."""
    for tmp in Path(out_dir).glob("ckpt.pt.*.tmp"):
        tmp.unlink(missing_ok=True)
        print(f"removed {tmp}, a checkpoint whose writing was cut off")


def check_distinct(**folders: str) -> None:
    """Refuse two flags naming one folder (`check_distinct(out_dir=..., sft_dir=...)`):
    one stage's checkpoint would overwrite the other's."""
    seen = {}
    for name, folder in folders.items():
        where = Path(folder).resolve()
        if where in seen:
            raise ArgumentError(f"{flag_name(seen[where])} and {flag_name(name)} both name {folder}: "
                                f"one checkpoint would overwrite the other")
        seen[where] = name


def check_weights_finite(step: int, *models, counter: str = "step") -> None:
    """Raise Diverged if a weight of the models is NaN or infinite: such a model is never saved."""
    assert models, "no models to check"
    if not all(torch.isfinite(p).all() for model in models for p in model.parameters()):
        raise Diverged(f"{counter} {step}: the weights hold NaN or infinite values: training diverged; "
                       f"a lower --lr may help")
