"""The pieces every script shares: command lines, checkpoints, schedules, metrics."""

import json
from dataclasses import dataclass

import pytest
import torch

from minalign.checkpoint import load_checkpoint, save_checkpoint
from minalign.cli import build_parser, parse_args
from minalign.logger import MetricsLogger
from minalign.optim import cosine_lr


@dataclass
class Args:
    """A demo command."""

    lr: float = 3e-4
    """Peak learning rate."""
    data: str | None = None
    """Where the data is."""
    steps: int = 10
    """How many steps."""
    compile: bool = False
    """Compile the model."""
    betas: tuple[float, ...] = (0.1, 0.5)
    """Values to sweep."""


def test_cli_types_defaults_and_help():
    assert parse_args(Args, []) == Args()
    args = parse_args(Args, ["--lr", "1e-3", "--data", "x.jsonl", "--steps", "7", "--compile", "--betas", "1", "2.5", "4"])
    assert args == Args(lr=1e-3, data="x.jsonl", steps=7, compile=True, betas=(1.0, 2.5, 4.0))
    assert parse_args(Args, ["--data", "none"]).data is None
    help_text = build_parser(Args).format_help()
    assert "Peak learning rate." in help_text and "--no-compile" in help_text and "A demo command." in help_text


def test_cli_rejects_bad_values(capsys):
    with pytest.raises(SystemExit):
        parse_args(Args, ["--steps", "many"])
    assert "--steps" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(Args, ["--betas", "0.1", "big"])
    assert "--betas" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(Args, ["--unknown", "1"])


def test_checkpoint_roundtrip_is_atomic_and_weights_only(tmp_path):
    path = tmp_path / "run" / "ckpt.pt"
    state = {"model": {"w": torch.randn(3, 4)}, "step": 7, "args": {"lr": 0.1, "data": None}}
    save_checkpoint(path, state)
    save_checkpoint(path, {**state, "step": 8})  # overwrite in place
    loaded = load_checkpoint(path)
    assert loaded["step"] == 8 and torch.equal(loaded["model"]["w"], state["model"]["w"])
    assert [p.name for p in path.parent.iterdir()] == ["ckpt.pt"]  # no temp files left behind


def test_checkpoint_refuses_pickled_code(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"obj": Args()}, path)  # an arbitrary Python object needs unpickling code
    with pytest.raises(Exception):
        load_checkpoint(path)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")


def test_cosine_schedule():
    lrs = [cosine_lr(s, 1.0, 100, 10, 0.1) for s in range(101)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # decays monotonically
    assert lrs[100] == pytest.approx(0.1)


def test_metrics_jsonl(tmp_path):
    logger = MetricsLogger(tmp_path)
    logger.log(1, loss=torch.tensor(2.5), lr=0.1)
    logger.log(2, loss=float("nan"))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["loss"] == 2.5 and rows[0]["step"] == 1 and rows[1]["loss"] == "nan"
    MetricsLogger(tmp_path / "quiet", enabled=False).log(1, loss=1.0)
    assert not (tmp_path / "quiet").exists()


@dataclass
class MoreArgs(Args):
    """A command that adds a flag."""

    beta: float = 0.1
    """Strength of the constraint."""


def test_cli_inherited_fields_keep_their_help():
    assert parse_args(MoreArgs, ["--beta", "0.5", "--steps", "3"]) == MoreArgs(steps=3, beta=0.5)
    help_text = build_parser(MoreArgs).format_help()
    assert "Peak learning rate." in help_text and "Strength of the constraint." in help_text
