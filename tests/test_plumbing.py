"""The pieces every script shares: command lines, checkpoints, schedules, metrics."""

import dataclasses
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from minalign import distributed
from minalign.checkpoint import load_checkpoint, save_checkpoint
from minalign.data import DataError
from minalign.cli import ArgumentError, build_parser, check_args, check_divisible, given, parse_args, refuse_given
from minalign.logger import MetricsLogger
from minalign.optim import cosine_lr

ROOT = Path(__file__).resolve().parents[1]


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
    sizes: tuple[int, ...] | None = None
    """Optional values (the flag alone: none)."""


def test_cli_types_defaults_and_help():
    assert parse_args(Args, []) == Args()
    args = parse_args(Args, ["--lr", "1e-3", "--data", "x.jsonl", "--steps", "7", "--compile", "--betas", "1", "2.5", "4"])
    assert args == Args(lr=1e-3, data="x.jsonl", steps=7, compile=True, betas=(1.0, 2.5, 4.0))
    assert parse_args(Args, ["--data", "none"]).data is None
    assert parse_args(Args, ["--sizes", "3", "4"]).sizes == (3, 4) and parse_args(Args, ["--sizes"]).sizes == ()
    help_text = build_parser(Args).format_help()
    assert "Peak learning rate." in help_text and "--no-compile" in help_text and "A demo command." in help_text
    assert " ".join(help_text.split()).count("(default: none)") == 2 and "None" not in help_text  # data, sizes
    import train_rm  # a help that states its default gets no second one

    rm_help = " ".join(build_parser(train_rm.Args).format_help().split())
    assert "out/rm-<data file name>). --sft-dir" in rm_help and "(default: builtin)" in rm_help


def test_each_scripts_main_block_runs_it():
    # The tests run the scripts through cli.run in the test process (tests/script_runs.py);
    # here, in one process of its own, each file's `__main__` block as `python train_x.py`
    # and `python -m experiments.x` reach it.
    scripts = ["train_sft.py", "train_rm.py", "train_dpo.py", "train_ppo.py"]
    modules = ["experiments.frontier", "experiments.label_noise", "experiments.overoptimization"]
    code = """if True:
        import runpy, sys
        for name in sys.argv[1:]:
            sys.argv = [name, "--help"]
            try:
                if name.endswith(".py"):
                    runpy.run_path(name, run_name="__main__")
                else:
                    runpy.run_module(name, run_name="__main__", alter_sys=True)
            except SystemExit as stop:
                print(f"{name} ended with {stop.code}", flush=True)
    """
    result = subprocess.run([sys.executable, "-c", code, *scripts, *modules], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    for name in scripts + modules:
        assert f"{name} ended with 0" in result.stdout, result.stdout[-3000:]
    assert result.stdout.count("usage: ") == len(scripts + modules)


def test_cli_rejects_bad_values(capsys):
    with pytest.raises(SystemExit):
        parse_args(Args, ["--steps", "many"])
    assert "--steps" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(Args, ["--betas", "0.1", "big"])
    assert "--betas" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(Args, ["--unknown", "1"])
    with pytest.raises(SystemExit):
        parse_args(Args, ["--step", "3"])  # a prefix of --steps: named, not taken for it
    assert "unrecognized arguments: --step 3" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(Args, ["--data", ""])
    assert "argument --data: empty" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(Args, ["--betas"])  # not optional: at least one value
    assert "--betas" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:  # a value the checks reject: one line, as the scripts' later checks
        parse_args(ValidatedArgs, ["--steps", "0"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.endswith(": error: --steps 0: must be > 0\n") and err.count("\n") == 1


@dataclass
class ValidatedArgs:
    """A demo command that checks its values."""

    steps: int = 10
    """How many steps."""

    def __post_init__(self):
        check_args(self, positive=("steps",))


def test_under_torchrun_local_rank_0_reports_a_mistake_first(capsys, monkeypatch):
    # The other local ranks report it too, but only after a wait in which torchrun stops
    # them once rank 0 has exited: one message a node, and none lost if only they meet it.
    import minalign.cli as cli

    waits = []
    monkeypatch.setattr(cli.time, "sleep", waits.append)
    monkeypatch.setattr(cli.os, "_exit", sys.exit)  # how a process torchrun started ends, made visible
    monkeypatch.setenv("RANK", "1")  # alone (another launcher's, or the user's) it delays nothing

    def failing(args):
        raise DataError("data.jsonl line 3: not JSON")

    for torchrun, local_rank, waits_first in ((None, "1", False), ("run-1", "1", True), ("run-1", "0", False)):
        if torchrun:
            monkeypatch.setenv("TORCHELASTIC_RUN_ID", torchrun)
        monkeypatch.setenv("LOCAL_RANK", local_rank)
        for argv, says in ((["--steps", "many"], "--steps"), (["--steps", "-1"], "--steps"),  # argparse's check, Args'
                           ([], "data.jsonl line 3")):  # and one the run meets
            waits.clear()
            with pytest.raises(SystemExit) as stop:
                cli.run(failing, ValidatedArgs, argv)
            assert stop.value.code == 2 and says in capsys.readouterr().err
            assert waits == ([cli.OTHER_RANKS_WAIT_S] if waits_first else [])


def test_cli_knows_which_flags_were_given_even_at_their_default():
    args = parse_args(Args, ["--lr", "3e-4", "--no-compile", "--betas", "0.1", "0.5"])
    assert args == Args() and given(args) == {"lr", "compile", "betas"}
    assert given(parse_args(Args, [])) == set()
    assert given(Args(steps=3, lr=3e-4)) == {"steps"}  # made in code: what differs from the defaults
    refuse_given(Args(steps=3), ("lr", "data"), "not here")  # none of them given: no error
    with pytest.raises(ArgumentError, match="^--lr, --compile: not here$"):
        refuse_given(args, ("lr", "compile", "steps"), "not here")


def test_batch_sizes_must_split_evenly_across_processes():
    check_divisible(Args(steps=12), ("steps",), 4)
    check_divisible(Args(steps=7), ("steps",), 1)
    with pytest.raises(ArgumentError, match="^--steps 10 must be divisible by the 4 processes$"):
        check_divisible(Args(), ("steps",), 4)


def test_ctrl_c_ends_a_script_with_one_line(capsys, monkeypatch):
    import minalign.cli as cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli.time, "sleep", lambda s: pytest.fail("Ctrl-C waits for nothing"))
    monkeypatch.setattr(cli.os, "_exit", sys.exit)
    for torchrun, local_rank, says in ((None, "1", True), ("run-1", "0", True), ("run-1", "1", False)):
        if torchrun:  # torchrun hands the signal to every process: local rank 0 says so
            monkeypatch.setenv("TORCHELASTIC_RUN_ID", torchrun)
        monkeypatch.setenv("LOCAL_RANK", local_rank)
        with pytest.raises(SystemExit) as stop:
            cli.run(interrupted, Args, [])
        err = capsys.readouterr().err
        assert stop.value.code == 130 and (err.endswith(": interrupted\n") if says else err == "")


def test_a_process_torchrun_started_ends_without_the_interpreters_teardown(capsys, monkeypatch):
    import minalign.cli as cli

    ended = []

    def end(status):  # os._exit, which would end this test's process too
        ended.append((status, capsys.readouterr().out))
        raise SystemExit(status)

    monkeypatch.setattr(cli.os, "_exit", end)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    cli.run(lambda args: print("trained"), Args, [])  # alone: main's return is run's
    assert ended == [] and capsys.readouterr().out == "trained\n"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "run-1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(SystemExit):
        cli.run(lambda args: print("trained"), Args, [])
    assert ended == [(0, "trained\n")]  # at once, its output written first


@dataclass
class RunArgs:
    out_dir: str = "out/x"
    """Where the checkpoint goes."""
    resume: bool = False
    """Go on from it."""


def test_a_run_stopped_with_a_checkpoint_to_go_on_from_says_how(capsys, monkeypatch):
    import minalign.cli as cli
    from minalign.resume import note_saved

    def interrupted_after(*saves):
        def main(args):
            for out_dir, step, resumable, world_size in saves:
                note_saved(out_dir, step, resumable, unit="update", world_size=world_size)
            raise KeyboardInterrupt
        return main

    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    script = Path(sys.argv[0]).name
    for saves, hint in ((([("o", 4, True, 1)]), f"; `python {script} --resume --out-dir o` goes on from its "
                                                  f"checkpoint at update 4"),
                        (([("o", 4, True, 1), ("o", 8, False, 1)]), ""),  # the final one: nothing to go on with
                        (([("o", 6, True, 2)]), f"; `python {script} --resume --out-dir o` (under torchrun, with 2 "
                                                f"processes) goes on from its checkpoint at update 6"),
                        ((), "")):
        note_saved("x", 0, resumable=False)  # what an earlier run in this process saved is forgotten
        with pytest.raises(SystemExit):
            cli.run(interrupted_after(*saves), RunArgs, ["--out-dir", "o"])
        assert capsys.readouterr().err.endswith(f": interrupted{hint}\n")
    with pytest.raises(SystemExit):  # a script without --resume (an experiment) names none
        cli.run(interrupted_after(("o", 4, True, 1)), Args, [])
    assert capsys.readouterr().err.endswith(": interrupted\n")
    with pytest.raises(SystemExit):  # nor for the SFT policy a later stage was training in its --sft-dir
        cli.run(interrupted_after(("sft", 4, True, 1)), RunArgs, ["--out-dir", "o"])
    assert capsys.readouterr().err.endswith(": interrupted\n")
    note_saved("x", 0, resumable=False)


def test_sigterm_ends_a_script_with_one_line_and_no_half_written_checkpoint(tmp_path, capsys, monkeypatch):
    import signal

    import minalign.cli as cli
    from minalign.checkpoint import replace_earlier_run
    from minalign.distributed import DistInfo

    def terminated_while_saving(args):  # as `timeout` or a scheduler would stop a run
        monkeypatch.setattr(torch, "save", lambda obj, f: os.kill(os.getpid(), signal.SIGTERM) or time.sleep(5))
        save_checkpoint(tmp_path / "ckpt.pt", {"step": 1})

    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as stop:
        cli.run(terminated_while_saving, Args, [])
    assert stop.value.code == 143 and capsys.readouterr().err.endswith(": terminated\n")
    assert list(tmp_path.iterdir()) == []  # the temporary file is removed, no ckpt.pt appears
    assert signal.getsignal(signal.SIGTERM) is before  # the caller's handler is back

    (tmp_path / "ckpt.pt.x1y2.tmp").write_bytes(b"cut off by kill -9")  # which no handler can clean up
    (tmp_path / "metrics.jsonl").write_text("")
    replace_earlier_run(tmp_path, DistInfo())  # a new run starts in the folder
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]
    assert "a checkpoint whose writing was cut off" in capsys.readouterr().out


def test_a_closed_output_pipe_stops_a_script_with_one_line():
    import sys

    code = ("from dataclasses import dataclass\nfrom minalign.cli import run\n"
            "@dataclass\nclass Args:\n    'A script that prints a lot.'\n"
            "def main(args):\n    for i in range(10**6):\n        print('progress', i, flush=True)\n"
            "run(main, Args, [])\n")
    script = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert script.stdout.readline() == "progress 0\n"
    script.stdout.close()  # as `| head -1` does
    err = script.stderr.read()
    assert script.wait(timeout=60) == 1
    assert err == "-c: stopped: the program reading its output closed the pipe\n"


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
    with pytest.raises(ArgumentError, match="weights_only=True refuses"):
        load_checkpoint(path)
    path.write_bytes(b"\x00" * 10)
    with pytest.raises(ArgumentError, match="evil.pt is not a readable checkpoint"):
        load_checkpoint(path)
    torch.save({"model": {"w": torch.randn(64, 64)}}, path)
    whole = path.read_bytes()
    for cut in (len(whole) // 3, len(whole) // 2, len(whole) - 10, len(whole) - 1):  # errors of several kinds
        path.write_bytes(whole[:cut])
        with pytest.raises(ArgumentError, match="evil.pt is not a readable checkpoint: truncated"):
            load_checkpoint(path)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")


def test_a_model_must_fit_the_runs_tokenizer_and_length(tmp_path):
    from minalign.checkpoint import load_model
    from minalign.model import GPT, GPTConfig
    from minalign.tokenizer import get_tokenizer

    builtin, gpt2 = get_tokenizer("builtin"), get_tokenizer("gpt2")
    model = GPT(GPTConfig(vocab_size=builtin.vocab_size, n_layer=1, n_head=2, n_embd=16, block_size=32))
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"model": model.state_dict(), "model_config": dataclasses.asdict(model.config),
                           "tokenizer": builtin.name})
    loaded, _ = load_model(path, "cpu", builtin, max_length=32)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    with pytest.raises(ArgumentError, match="trained with tokenizer 'builtin', not 'gpt2': pass --tokenizer builtin"):
        load_model(path, "cpu", gpt2)
    with pytest.raises(ArgumentError, match="--max-length 33 exceeds the block size 32"):
        load_model(path, "cpu", builtin, max_length=33)
    config = dataclasses.asdict(model.config)
    for damaged, why in (({**config, "n_layer": 2}, r"Missing key\(s\) in state_dict"),
                         ({**config, "n_embd": 32}, r"size mismatch")):
        save_checkpoint(path, {"model": model.state_dict(), "model_config": damaged})
        with pytest.raises(ArgumentError, match=rf"ckpt.pt: its weights and model_config do not fit together "
                                                rf"\(.*{why}.*\): damaged, or not written by these scripts$"):
            load_model(path)
    for damaged in ({**config, "depth": 3}, None):
        save_checkpoint(path, {"model": model.state_dict(), "model_config": damaged})
        with pytest.raises(ArgumentError, match=r"ckpt.pt: no model_config these scripts can read \(TypeError: "):
            load_model(path)


def test_a_new_run_replaces_the_earlier_runs_outputs_and_nothing_else(tmp_path, capsys):
    from minalign.checkpoint import replace_earlier_run

    for name in ("ckpt.pt", "eval.json", "metrics.jsonl", "sft_data.jsonl"):
        (tmp_path / name).write_text("earlier")
    replace_earlier_run(tmp_path, distributed.DistInfo(rank=1))  # the other processes leave it to the main one
    assert len(list(tmp_path.iterdir())) == 4 and capsys.readouterr().out == ""
    replace_earlier_run(tmp_path, distributed.DistInfo())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl", "sft_data.jsonl"]  # the logger's; inputs
    assert capsys.readouterr().out == f"replacing the earlier run in {tmp_path}: removed ckpt.pt, eval.json\n"
    replace_earlier_run(tmp_path / "new", distributed.DistInfo())  # nothing there: nothing said
    assert capsys.readouterr().out == ""


def test_cosine_schedule():
    lrs = [cosine_lr(s, 1.0, 100, 10, 0.1) for s in range(101)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # decays monotonically
    assert lrs[100] == pytest.approx(0.1)
    assert cosine_lr(10, 1.0, 100, 10) == pytest.approx(1.0)  # the end of the warmup is the peak
    assert max(cosine_lr(s, 1.0, 100, 10) for s in range(200)) == pytest.approx(1.0)  # never above it
    assert cosine_lr(55, 1.0, 100, 10) == pytest.approx(0.55)  # half way through the decay: (1 + 0.1) / 2
    assert cosine_lr(150, 1.0, 100, 10) == pytest.approx(0.1)  # past the end: stays at the floor
    from minalign.optim import warmup_note

    assert warmup_note(10, 100) == warmup_note(10, 10) == ""  # the peak is reached
    assert warmup_note(500, 10) == ("note: --warmup-steps 500 outlasts the 10 steps: the learning rate rises "
                                    "throughout, to 2% of --lr")  # step 9 of the warmup: 10/500
    assert "outlasts the 1 step:" in warmup_note(20, 1)


def test_metrics_jsonl_holds_one_row_a_step_and_writes_nan_as_text(tmp_path):
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


def test_the_scripts_reject_out_of_range_values_naming_the_flag(capsys):
    import importlib
    import sys

    from minalign.cli import ArgumentError

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the scripts live at the top
    scripts = {name: importlib.import_module(name) for name in ("train_sft", "train_rm", "train_dpo", "train_ppo")}
    cases = [
        ("train_sft", ["--batch-size", "0"], "--batch-size 0: must be > 0"),
        ("train_sft", ["--dtype", "bf16"], "--dtype 'bf16': must be one of"),
        ("train_sft", ["--n-embd", "130"], "--n-embd 130 must be a multiple of --n-head 4"),
        ("train_sft", ["--lr", "nan"], "--lr nan: must be finite"),
        ("train_sft", ["--lr", "inf"], "--lr inf: must be finite"),
        ("train_sft", ["--val-fraction", "1"], "--val-fraction 1.0: must be below 1"),
        ("train_ppo", ["--kl-coef", "inf"], "--kl-coef inf: must be finite"),
        ("train_ppo", ["--missing-eos-score", "nan"], "--missing-eos-score nan: must be finite"),
        ("train_rm", ["--label-temperature", "-0.2"], "--label-temperature -0.2: must be > 0"),
        ("train_rm", ["--test-fraction", "1"], "--test-fraction 1.0"),
        ("train_dpo", ["--loss-type", "kto"], "--loss-type 'kto': must be one of 'sigmoid', 'ipo', 'hinge', 'robust'"),
        ("train_dpo", ["--loss-type", "ipo", "--label-smoothing", "0.1"], "--label-smoothing applies to"),
        ("train_dpo", ["--label-flip", "1.5"], "--label-flip 1.5: must be between 0 and 1"),
        ("train_ppo", ["--temperature", "0"], "--temperature 0.0: must be > 0"),
        ("train_ppo", ["--kl-estimator", "k2"], "--kl-estimator 'k2'"),
        ("train_ppo", ["--lam", "1.1"], "--lam 1.1: must be between 0 and 1"),
        ("train_sft", ["--dropout", "1"], "--dropout 1.0: must be in [0, 1)"),
        ("train_sft", ["--num-samples", "2000"], "--num-samples 2000: the built-in task's val split has 1,000"),
        ("train_rm", ["--seed", "99999999999999999999"], "--seed 99999999999999999999: must be in [0, 2^32)"),
        ("train_ppo", ["--seed", "-1"], "--seed -1: must be in [0, 2^32)"),
        ("train_ppo", ["--minibatch-size", "100"], "--minibatch-size 100: more than the --rollout-batch-size 64"),
        ("train_ppo", ["--minibatch-size", "48"], "--minibatch-size 48 must divide --rollout-batch-size 64"),
        ("train_ppo", ["--kl-target", "6", "--kl-coef", "0"], "--kl-target: the controller scales --kl-coef"),
    ]
    for script, argv, message in cases:
        with pytest.raises(SystemExit) as stop:
            parse_args(scripts[script].Args, argv)
        assert stop.value.code == 2 and message in capsys.readouterr().err, (script, argv)
    for script in scripts.values():  # the defaults pass
        assert parse_args(script.Args, []) == script.Args()
    from experiments import frontier, label_noise
    for cls, argv, message in ((frontier.Args, ["--dpo-betas", "0.1", "-1"], "--dpo-betas -1.0: must be > 0"),
                               (label_noise.Args, ["--flips", "0", "1.5"], "--flips 1.5: must be between 0 and 1")):
        with pytest.raises(SystemExit):
            parse_args(cls, argv)
        assert message in capsys.readouterr().err
    with pytest.raises(ArgumentError, match="--epochs 0"):  # values set in code are checked too
        scripts["train_ppo"].Args(epochs=0)


def test_a_loss_gone_nan_or_infinite_stops_the_run():
    from minalign.cli import Diverged, check_finite

    check_finite(3, loss=1.5, kl=-0.2)
    with pytest.raises(Diverged, match=r"step 7: loss nan, kl inf: training diverged"):
        check_finite(7, loss=float("nan"), kl=float("inf"), ok=0.0)
    with pytest.raises(Diverged, match=r"update 2: kl nan"):
        check_finite(2, "update", kl=float("nan"))


def test_metrics_start_afresh_or_resume_where_the_checkpoint_was(tmp_path):
    old = MetricsLogger(tmp_path)
    for step in (1, 2, 3):
        old.log(step, loss=float(step))
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "lo')  # torn by a crash mid-write
    MetricsLogger(tmp_path, resume_step=2).log(3, loss=30.0)  # step 3 again, after a checkpoint at 2

    def steps_and_losses():
        rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["loss"]) for r in rows]
    assert steps_and_losses() == [(1, 1.0), (2, 2.0), (3, 30.0)]
    new = MetricsLogger(tmp_path)  # a new run: the earlier run's records are gone before it logs
    assert not (tmp_path / "metrics.jsonl").exists()
    new.log(1, loss=5.0)
    assert steps_and_losses() == [(1, 5.0)]


def _reduce_in_process(rank, init_file, results):
    import torch.distributed as torch_dist

    from minalign import distributed

    torch_dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    info = distributed.DistInfo(rank=rank, world_size=2)
    mine = {"loss": 1.0 + rank, "min_reward": -1.0 - rank, "max_reward": 2.0 * rank, "count": 3 + rank}
    results[rank] = distributed.reduce_metrics(mine, info, lowest=["min_reward"], highest=["max_reward"],
                                               summed=["count"])
    torch_dist.destroy_process_group()


def test_reduce_metrics_over_two_processes(tmp_path):
    import torch.multiprocessing as mp

    from minalign import distributed

    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_reduce_in_process, args=(str(tmp_path / "init"), results), nprocs=2)
        expected = {"loss": 1.5, "min_reward": -2.0, "max_reward": 2.0, "count": 7.0}
        assert results[0] == results[1] == expected
    alone = {"loss": 1.0}
    assert distributed.reduce_metrics(alone, distributed.DistInfo()) is alone


def test_device_is_checked_before_any_work():
    from minalign import distributed
    from minalign.cli import ArgumentError

    with pytest.raises(ArgumentError, match="--device 'gpu': must be auto, cpu, cuda or cuda:N"):
        distributed.setup("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ArgumentError, match="--device cuda:1: no CUDA device is available"):
            distributed.setup("cuda:1")
    assert distributed.setup("cpu").device == "cpu"


def test_a_cuda_device_that_is_not_there_is_refused(monkeypatch):
    from minalign import distributed
    from minalign.cli import ArgumentError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert distributed.check_device("cuda:1") == "cuda:1" and distributed.check_device("auto") == "cuda"
    with pytest.raises(ArgumentError, match=r"^--device cuda:2: there are 2 CUDA devices, cuda:0 to cuda:1$"):
        distributed.check_device("cuda:2")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ArgumentError, match=r"^--device cuda:1: there is only cuda:0$"):
        distributed.check_device("cuda:1")
    # under torchrun each process takes the device of its LOCAL_RANK
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(ArgumentError, match=r"^--device cuda:0: under torchrun each process takes cuda:<its LOCAL_RANK>"):
        distributed.setup("cuda:0")
    with pytest.raises(ArgumentError, match=r"^torchrun's process LOCAL_RANK 1 has no CUDA device of its own "
                                            r"\(there is only cuda:0\): start at most 1 per node$"):
        distributed.setup("auto")


def test_an_output_folder_that_cannot_be_written_is_refused_before_any_work(tmp_path):
    from minalign.checkpoint import check_distinct, check_out_dir

    check_out_dir(tmp_path / "new" / "run")
    assert not (tmp_path / "new").exists()  # made by what writes there first: a refused run leaves nothing
    (tmp_path / "file").write_text("")
    with pytest.raises(ArgumentError, match=r"--out-dir .*file: a file, not a folder"):
        check_out_dir(tmp_path / "file")
    with pytest.raises(ArgumentError, match=r"--out-dir .*file/run: cannot write there \(.*file is a file\)"):
        check_out_dir(tmp_path / "file" / "run")
    with pytest.raises(ArgumentError, match=r"^--sft-dir '': empty; name a folder$"):
        check_out_dir("", "--sft-dir")
    check_distinct(out_dir=str(tmp_path / "a"), sft_dir=str(tmp_path / "b"))
    with pytest.raises(ArgumentError, match=r"^--out-dir and --sft-dir both name .*/a/../a: one checkpoint would"):
        check_distinct(out_dir=str(tmp_path / "a"), sft_dir=str(tmp_path / "a" / ".." / "a"))
    # a folder whose checkpoint another stage wrote: nothing is saved over it
    fake = {"model": {}, "model_config": {}, "args": {"max_steps": 5}, "step": 5}
    save_checkpoint(tmp_path / "sft" / "ckpt.pt", fake)  # from before checkpoints named their stage
    check_out_dir(tmp_path / "sft", stage="sft")
    for stage, extra in (("dpo", {"args": {"loss_type": "sigmoid"}}), ("ppo", {"args": {"kl_coef": 0.05}}),
                         ("rm", {"args": {"epochs": 4}, "kind": "reward"})):
        save_checkpoint(tmp_path / stage / "ckpt.pt", {**fake, **extra})
        check_out_dir(tmp_path / stage, stage=stage)
        with pytest.raises(ArgumentError, match="holds a"):
            check_out_dir(tmp_path / stage, stage="sft")
    with pytest.raises(ArgumentError, match=r"--rm-dir .*sft: .*ckpt.pt holds an SFT policy, not a reward model"):
        check_out_dir(tmp_path / "sft", "--rm-dir", stage="rm")
    (tmp_path / "sft" / "ckpt.pt").write_text("junk")
    with pytest.raises(ArgumentError, match=r"--out-dir .*sft: .*ckpt.pt is not a readable checkpoint: .*\); "
                                            r"remove it, or name another folder$"):
        check_out_dir(tmp_path / "sft", stage="sft")


def test_a_finished_checkpoint_a_later_stage_only_reads_needs_no_writable_folder(tmp_path, read_only):
    from minalign import checkpoint
    from minalign.checkpoint import check_out_dir

    sft = {"model": {}, "model_config": {}, "stage": "sft", "args": {"max_steps": 5}, "step": 5}
    save_checkpoint(tmp_path / "sft" / "ckpt.pt", sft)
    save_checkpoint(tmp_path / "rm" / "ckpt.pt", {**sft, "stage": "rm", "args": {"epochs": 1}, "kind": "reward"})
    save_checkpoint(tmp_path / "short" / "ckpt.pt", {**sft, "step": 4})  # cut short: finished in its folder
    read_only(tmp_path)
    with pytest.raises(PermissionError):
        save_checkpoint(tmp_path / "sft" / "ckpt.pt", sft)  # as the real thing would refuse
    check_out_dir(tmp_path / "sft", "--sft-dir", stage="sft", read_finished=True)
    check_out_dir(tmp_path / "rm", "--rm-dir", stage="rm", read_finished=True)
    with pytest.raises(ArgumentError, match=r"^--out-dir .*sft: cannot write there \(Permission denied\)$"):
        check_out_dir(tmp_path / "sft", stage="sft")  # a run writing there still needs to
    with pytest.raises(ArgumentError, match=r"^--sft-dir .*short: cannot write there"):
        check_out_dir(tmp_path / "short", "--sft-dir", stage="sft", read_finished=True)
    assert checkpoint.finished({**sft, "stage": None})  # written before checkpoints named their stage
    assert not checkpoint.finished({**sft, "stage": None, "step": 4})
    ppo = {**sft, "stage": "ppo", "args": {"updates": 8}, "step": 4}
    assert checkpoint.finished(ppo) and not checkpoint.finished({**ppo, "resume": {}})  # state to go on from


def test_batches_shuffle_by_seed_and_epoch():
    batches = distributed.Batches(10, 4, seed=1)
    assert batches.steps_per_epoch == 2  # the last 2 examples of each epoch are dropped
    epoch0 = [batches.indices(step) for step in range(2)]
    assert all(len(b) == 4 for b in epoch0) and len(set(sum(epoch0, []))) == 8
    assert epoch0 == [distributed.Batches(10, 4, seed=1).indices(step) for step in range(2)]  # resumable
    assert epoch0 != [distributed.Batches(10, 4, seed=2).indices(step) for step in range(2)]
    assert epoch0 != [batches.indices(step) for step in range(2, 4)]  # a new shuffle per epoch
    assert batches.indices(5) == distributed.Batches(10, 4, seed=1).indices(5)
    # the run's header says what the short last batch leaves out, and that it changes
    assert batches.describe_left_out("pairs") == " (2 of the 10 pairs left out of each epoch, drawn anew each epoch)"
    assert set(range(10)) - set(sum(epoch0, [])) != set(range(10)) - set(batches.indices(2) + batches.indices(3))
    assert distributed.Batches(12, 4).describe_left_out() == ""


def test_batches_shard_one_global_batch_across_ranks():
    world = [distributed.Batches(103, 8, seed=3, rank=r, world_size=4) for r in range(4)]
    single = distributed.Batches(103, 8, seed=3)
    for step in range(30):
        parts = [b.indices(step) for b in world]
        assert all(len(p) == 2 for p in parts)
        assert sorted(sum(parts, [])) == sorted(single.indices(step))  # distinct, and all of it
    with pytest.raises(ValueError, match="multiple"):
        distributed.Batches(10, 6, world_size=4)
    with pytest.raises(ValueError, match="one batch"):
        distributed.Batches(3, 4)


def test_weights_gone_nan_or_infinite_are_never_saved():
    from minalign.checkpoint import check_weights_finite
    from minalign.cli import Diverged

    model = torch.nn.Linear(3, 2)
    check_weights_finite(4, model, torch.nn.Linear(2, 2))
    with torch.no_grad():
        model.bias[1] = float("inf")
    with pytest.raises(Diverged, match="update 9: the weights hold NaN or infinite values"):
        check_weights_finite(9, torch.nn.Linear(2, 2), model, counter="update")


def test_progress_line_counts_steps_or_updates():
    from minalign.logger import Progress

    assert Progress(120).line(3, loss=0.5).startswith("step     3/120 | loss 0.5 | elapsed ")
    assert Progress(120, unit="update").line(3).startswith("update     3/120 | elapsed ")


def test_counts_read_as_words():
    from minalign.logger import counted

    assert counted(1, "step") == "1 step"
    assert counted(0, "empty one") == "0 empty ones"
    assert counted(2077, "step") == "2,077 steps"


def test_each_scripts_resume_help_names_the_flags_a_resumed_run_may_change():
    import re

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the scripts live at the top
    import train_dpo
    import train_ppo
    import train_rm

    from minalign import pairs
    from minalign.cli import field_docs, flag

    for script, may_change in ((train_rm, pairs.RESUME_MAY_CHANGE), (train_dpo, train_dpo.RESUME_MAY_CHANGE),
                               (train_ppo, train_ppo.RESUME_MAY_CHANGE)):
        named = set(re.findall(r"--[a-z][a-z-]*", field_docs(script.Args)["resume"]))
        assert named == {flag(name) for name in may_change if name != "resume"}, script.__name__


def test_a_run_saves_to_resume_from_at_each_interval_and_where_it_stops(capsys):
    from minalign.resume import note_saved, save_due, stopped_early

    # 10 steps, every 4, stopped at 6 by --stop-at or run to the end
    assert [s for s in range(1, 7) if save_due(s, 6, 4)] == [4, 6]
    assert [s for s in range(1, 11) if save_due(s, 10, 4)] == [4, 8, 10]  # the end: before the final evaluation
    note_saved("out/x", 6, resumable=True, world_size=2)
    assert stopped_early("train_x.py", "out/x", 6, 10)
    assert capsys.readouterr().out == ("stopped at step 6 of 10: continue with `python train_x.py --resume --out-dir "
                                       "out/x` (under torchrun, with 2 processes)\n")
    assert not stopped_early("train_x.py", "out/x", 10, 10) and capsys.readouterr().out == ""
    note_saved("out/x", 10, resumable=False)  # (this process's record of what it saved, cleared)


def test_block_size_of_a_plain_state_dict_is_the_default_and_its_folder_is_refused_by_stage(tmp_path):
    from minalign.checkpoint import block_size_of, check_out_dir

    torch.save({"wte.weight": torch.zeros(2, 2)}, tmp_path / "ckpt.pt")  # a bare state dict, not a minalign checkpoint
    assert block_size_of(tmp_path, default=64) == 64
    save_checkpoint(tmp_path / "ckpt.pt", {"model": {}, "model_config": {"block_size": 48}, "args": {}, "stage": "sft"})
    assert block_size_of(tmp_path, default=64) == 48
    torch.save({"wte.weight": torch.zeros(2, 2)}, tmp_path / "ckpt.pt")
    with pytest.raises(ArgumentError, match="not a checkpoint of these scripts"):
        check_out_dir(tmp_path, "--sft-dir", stage="sft", read_finished=True)
