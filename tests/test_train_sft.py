"""End-to-end runs of train_sft.py, with a tiny model."""

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from minalign import resume
from minalign.checkpoint import load_checkpoint
from script_runs import run_script

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "48", "--batch-size", "8",
        "--eval-interval", "1000", "--eval-examples", "16", "--log-interval", "2", "--num-samples", "1",
        "--warmup-steps", "2"]


def run(args, nproc=1, own_process=False):
    done = run_script("train_sft.py", args, nproc, own_process=own_process)
    assert done.returncode == 0, done.output()
    return done.stdout


@pytest.mark.slow
def test_smoke_run_learns_and_writes_outputs(tmp_path):
    from minalign.checkpoint import save_checkpoint

    save_checkpoint(tmp_path / "ckpt.pt", {"stage": "sft", "args": {}, "model": {}, "model_config": {}})  # earlier
    (tmp_path / "eval.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("mine")
    out = run([*TINY, "--max-steps", "30", "--lr", "3e-3", "--out-dir", str(tmp_path)])
    assert "val loss" in out and "sample:" in out and "eta" in out
    assert f"replacing the earlier run in {tmp_path}: removed ckpt.pt, eval.json" in out
    assert not (tmp_path / "eval.json").exists() and (tmp_path / "notes.txt").read_text() == "mine"
    rows = [l for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [eval(r.replace("null", "None"))["loss"] for r in rows if '"loss"' in r]
    assert losses[-1] < losses[0] - 0.5  # it learns
    ckpt = load_checkpoint(tmp_path / "ckpt.pt")
    assert ckpt["step"] == 30 and ckpt["model_config"]["n_layer"] == 1


@pytest.mark.slow
def test_resume_is_bit_for_bit(tmp_path):
    run([*TINY, "--max-steps", "8", "--out-dir", str(tmp_path / "full")])
    out = run([*TINY, "--max-steps", "8", "--stop-at", "4", "--out-dir", str(tmp_path / "split")])
    assert out.splitlines()[-1] == (f"stopped at step 4 of 8: continue with `python train_sft.py --resume --out-dir "
                                    f"{tmp_path / 'split'}`")
    assert load_checkpoint(tmp_path / "split" / "ckpt.pt")["step"] == 4
    with open(tmp_path / "split" / "metrics.jsonl", "a") as f:  # logged after the checkpoint, then cut short
        f.write(json.dumps({"step": 6, "loss": 123.0}) + "\n")
    # the run goes on as it was started: a setting given anew is refused, one left out is the checkpoint's
    # (its default too: --max-steps 800)
    refused = run_script("train_sft.py", [*TINY, "--resume", "--n-layer", "2", "--lr", "0.1", "--max-steps", "800",
                                          "--out-dir", tmp_path / "split"])
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
    assert "--n-layer 2 (it has 1), --max-steps 800 (it has 8), --lr 0.1 (it has 0.002)" in refused.stderr
    out = run([*TINY, "--resume", "--out-dir", str(tmp_path / "split")])  # --max-steps 8 from the checkpoint
    assert "step     6/8" in out and "replacing" not in out  # its own checkpoint is kept
    assert "done: 8 steps (4 in this invocation) in" in out
    full = load_checkpoint(tmp_path / "full" / "ckpt.pt")
    split = load_checkpoint(tmp_path / "split" / "ckpt.pt")
    assert split["step"] == 8
    for name, value in full["model"].items():
        assert torch.equal(value, split["model"][name]), name

    def losses(folder):  # (step, loss) of every training record
        rows = [json.loads(line) for line in (tmp_path / folder / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["loss"]) for r in rows if "loss" in r]
    assert losses("split") == losses("full") == [(s, losses("full")[i][1]) for i, s in enumerate([2, 4, 6, 8])]


def test_a_diverged_run_stops_with_one_line_and_saves_nothing(tmp_path):
    for interval, message in (("1000", "step 2: loss nan: training diverged"),  # caught at a progress line
                              ("1", "step 1: val_loss nan: training diverged")):  # or at a checkpoint
        result = run_script("train_sft.py", [*TINY, "--max-steps", "4", "--lr", "1e30", "--eval-interval", interval,
                                             "--out-dir", tmp_path])
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
        assert message in result.stderr
        assert not (tmp_path / "ckpt.pt").exists()


@pytest.mark.slow
@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("clang++")), reason="torch.compile needs a C++ compiler")
def test_compiled_training_equals_eager_and_saves_the_plain_model(tmp_path):
    run([*TINY, "--max-steps", "4", "--out-dir", str(tmp_path / "eager")])
    run([*TINY, "--max-steps", "4", "--compile", "--out-dir", str(tmp_path / "compiled")], own_process=True)
    eager = load_checkpoint(tmp_path / "eager" / "ckpt.pt")["model"]
    compiled = load_checkpoint(tmp_path / "compiled" / "ckpt.pt")["model"]
    assert compiled.keys() == eager.keys()  # the model's own names, loadable without torch.compile
    for name in eager:  # Adam moves a weight by up to --lr (2e-3) a step, nearly as much where its gradient is tiny
        torch.testing.assert_close(compiled[name], eager[name], atol=1e-4, rtol=1e-4, msg=name)

    def losses(folder):
        rows = [json.loads(line) for line in (tmp_path / folder / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in rows if "loss" in r]
    assert losses("compiled") == pytest.approx(losses("eager"), abs=1e-4) and len(losses("eager")) == 2


@pytest.mark.slow
def test_two_process_ddp_equals_one_process(tmp_path):
    run([*TINY, "--max-steps", "4", "--out-dir", str(tmp_path / "one")])
    run([*TINY, "--max-steps", "4", "--out-dir", str(tmp_path / "two")], nproc=2)
    one = load_checkpoint(tmp_path / "one" / "ckpt.pt")["model"]
    two = load_checkpoint(tmp_path / "two" / "ckpt.pt")["model"]
    for name in one:
        torch.testing.assert_close(one[name], two[name], atol=2e-5, rtol=1e-4, msg=name)
    # and training did move the weights (a run with learning rate 0 keeps the init)
    run([*TINY, "--max-steps", "1", "--lr", "0", "--warmup-steps", "1", "--out-dir", str(tmp_path / "init")])
    init = load_checkpoint(tmp_path / "init" / "ckpt.pt")["model"]
    assert sum((one[n] - init[n]).abs().sum() for n in one) > 0


@pytest.mark.slow
def test_a_run_diverging_under_two_processes_stops_on_both(tmp_path):
    # the main process evaluates; the other must stop too, not wait for it forever
    result = run_script("train_sft.py", [*TINY, "--max-steps", "4", "--lr", "1e30", "--eval-interval", "1",
                                         "--out-dir", tmp_path], nproc=2, timeout=240)
    assert result.returncode != 0
    # both stop; local rank 0 says why (the other would too, after a wait in which torchrun stops it)
    assert result.stderr.count("step 1: val_loss nan: training diverged") == 1, result.stderr[-3000:]
    assert not (tmp_path / "ckpt.pt").exists()


def test_val_fraction_without_data_is_refused_not_ignored(tmp_path):
    sys.path.insert(0, str(ROOT))
    import train_sft

    from minalign.cli import ArgumentError, parse_args
    from minalign.distributed import DistInfo

    args = parse_args(train_sft.Args, ["--val-fraction", "0.05", "--out-dir", str(tmp_path / "sft")])  # its default
    with pytest.raises(ArgumentError, match="--val-fraction: applies to --data; the built-in task has its own"):
        train_sft.train(args, DistInfo())
    assert not (tmp_path / "sft").exists()  # refused before the output folder is made


def test_resume_takes_what_was_left_out_from_the_checkpoint():
    sys.path.insert(0, str(ROOT))
    import train_sft
    from dataclasses import asdict

    from minalign.cli import ArgumentError, parse_args

    saved = asdict(parse_args(train_sft.Args, ["--data", "d/x.jsonl", "--eval-interval", "20", "--lr", "0.01",
                                               "--device", "cpu", "--out-dir", "a"]))
    def resumed_args(argv):
        return resume.resumed_args(parse_args(train_sft.Args, argv), saved, may_change=train_sft.RESUME_MAY_CHANGE,
                                   own=train_sft.NOT_RESUMED)

    resumed = resumed_args(["--resume", "--data", "d/../d/x.jsonl", "--out-dir", "b"])
    assert (resumed.eval_interval, resumed.lr, resumed.data) == (20, 0.01, "d/../d/x.jsonl")  # the same file
    assert (resumed.out_dir, resumed.device, resumed.resume) == ("b", "auto", True)  # this invocation's own
    again = resumed_args(["--resume", "--eval-interval", "5", "--num-samples", "2000"])
    assert (again.eval_interval, again.num_samples) == (5, 2000)  # may change; --data has more than 1,000 to show
    with pytest.raises(ArgumentError, match=r"--data y.jsonl \(it has d/x.jsonl\)"):
        resumed_args(["--resume", "--data", "y.jsonl"])


@pytest.mark.slow
def test_a_policy_cut_short_is_finished_in_the_folder_it_is_in_now(tmp_path):
    # the checkpoint records where it was written; a later stage names where it is now
    sys.path.insert(0, str(ROOT))
    import train_sft

    from minalign.cli import ArgumentError
    from minalign.distributed import DistInfo

    run([*TINY, "--max-steps", "4", "--stop-at", "2", "--out-dir", str(tmp_path / "a")])
    (tmp_path / "a").rename(tmp_path / "b")
    path = train_sft.ensure(str(tmp_path / "b"), DistInfo())
    assert path == str(tmp_path / "b" / "ckpt.pt") and load_checkpoint(path)["step"] == 4
    assert not (tmp_path / "a").exists()
    with pytest.raises(ArgumentError, match="^--resume: the run in .*b finished at step 4: nothing is left to train$"):
        train_sft.train(train_sft.Args(**{**load_checkpoint(path)["args"], "out_dir": str(tmp_path / "b"),
                                         "resume": True, "stop_at": None}), DistInfo())
    run([*TINY, "--max-steps", "4", "--stop-at", "2", "--out-dir", str(tmp_path / "c")])
    with pytest.raises(ArgumentError, match="--stop-at 1: the run in .* is at step 2 already"):
        train_sft.train(train_sft.Args(**{**load_checkpoint(tmp_path / "c" / "ckpt.pt")["args"],
                                         "out_dir": str(tmp_path / "c"), "resume": True, "stop_at": 1}), DistInfo())
    with pytest.raises(ArgumentError, match="^--stop-at 5: the run ends at --max-steps 4; stop it earlier"):
        train_sft.train(train_sft.Args(**{**load_checkpoint(tmp_path / "c" / "ckpt.pt")["args"],
                                         "out_dir": str(tmp_path / "c"), "resume": True, "stop_at": 5}), DistInfo())
    with pytest.raises(ArgumentError, match="^--stop-at 9: the run ends at --max-steps 4"):  # a new run too
        train_sft.train(train_sft.Args(max_steps=4, stop_at=9, out_dir=str(tmp_path / "d")), DistInfo())
    assert not (tmp_path / "d").exists()


def test_data_missing_or_with_nothing_left_to_train_on_is_named(tmp_path):
    (tmp_path / "one.txt").write_text("A single document.\n")
    result = run_script("train_sft.py", [*TINY, "--data", tmp_path / "one.txt", "--out-dir", tmp_path / "sft"])
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert ("one.txt: 1 example (a .txt file's documents are separated by blank lines; .jsonl holds one per "
            "line), all held out by --val-fraction 0.05 (at least one is)") in result.stderr
    assert not (tmp_path / "sft").exists()
    for where, why in ((tmp_path / "nowhere.txt", "no such file"), (tmp_path, "a folder, not a data file")):
        result = run_script("train_sft.py", [*TINY, "--data", where, "--out-dir", tmp_path / "sft"])
        assert result.returncode == 2 and result.stderr.endswith(f"error: {where}: {why}\n"), result.stderr
        assert not (tmp_path / "sft").exists()


@pytest.mark.slow
def test_resume_refuses_a_data_file_that_changed(tmp_path):
    docs = tmp_path / "docs.txt"
    docs.write_text("\n\n".join(f"Document number {i} says hello to the reader." for i in range(40)))
    run([*TINY, "--data", str(docs), "--max-steps", "4", "--stop-at", "2", "--out-dir", str(tmp_path / "sft")])
    run(["--resume", "--stop-at", "3", "--out-dir", str(tmp_path / "sft")])  # the same file goes on
    for changed in (docs.read_text() + "\n\nOne more document.", "One document, too few to split."):
        docs.write_text(changed)  # the change is named first, before what else is wrong with the file
        result = run_script("train_sft.py", ["--resume", "--out-dir", tmp_path / "sft"])
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert "docs.txt has changed since the run in" in result.stderr
    docs.rename(tmp_path / "moved.txt")  # a file that moved is asked for where it is now
    result = run_script("train_sft.py", ["--resume", "--out-dir", tmp_path / "sft"])
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.endswith(f"--resume: the run's data file {docs} is not there any more: pass --data and "
                                  f"where it is now\n")


def test_trained_on_knows_a_data_file_by_its_bytes_wherever_it_is(tmp_path):
    from minalign.checkpoint import file_fingerprint

    (tmp_path / "a.txt").write_text("some documents")
    (tmp_path / "moved.txt").write_text("some documents")
    (tmp_path / "other.txt").write_text("other documents")
    ckpt = {"args": {"data": str(tmp_path / "a.txt")}, "data_sha256": file_fingerprint(tmp_path / "a.txt")}
    assert resume.trained_on(ckpt, str(tmp_path / "moved.txt"))
    assert not resume.trained_on(ckpt, str(tmp_path / "other.txt")) and not resume.trained_on(ckpt, None)
    assert not resume.trained_on(ckpt, str(tmp_path / "gone.txt"))  # a file no longer there: False, not an error
    builtin = {"args": {"data": None}}
    assert resume.trained_on(builtin, None) and not resume.trained_on(builtin, str(tmp_path / "a.txt"))
    unhashed = {"args": {"data": str(tmp_path / "a.txt")}}  # from before checkpoints hashed their data
    assert resume.trained_on(unhashed, str(tmp_path / "." / "a.txt"))
    assert not resume.trained_on(unhashed, str(tmp_path / "moved.txt"))


def test_samples_of_prompts_longer_than_half_the_block_keep_their_end(capsys):
    import train_sft

    from minalign.model import GPT, GPTConfig
    from minalign.tokenizer import get_tokenizer

    tok = get_tokenizer("builtin")
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=16, block_size=16)).eval()
    long = "This film was a long and winding tale of love, loss and many things besides"  # > 8 tokens
    train_sft.print_samples(model, tok, ["A fine", long], block_size=16, seed=0)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[0].startswith("  sample: 'A fine")
    kept = tok.decode(tok.encode(long)[-8:])  # half the block
    assert lines[1].startswith(f"  sample: ...{kept!r}"[:-1]) and "This film" not in lines[1]
    train_sft.print_samples(model, tok, [], block_size=16, seed=0)  # --num-samples 0
    assert capsys.readouterr().out == ""


def test_validation_loss_is_the_mean_over_trained_tokens_of_all_batches():
    sys.path.insert(0, str(ROOT))
    import train_sft
    from contextlib import nullcontext

    import torch.nn.functional as F

    from minalign import data
    from minalign.model import GPT, GPTConfig
    from minalign.tokenizer import get_tokenizer

    tokenizer = get_tokenizer("builtin")
    rows = [{"prompt": "the film was", "completion": " a quiet and moving story."},
            {"prompt": "i watched it twice and", "completion": " loved it."},
            {"text": "a dull plot, but the actors were great."}]
    examples, _ = data.tokenize_sft(rows, tokenizer, max_length=16)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=32,
                          pad_id=tokenizer.pad_id))
    # batches of 2 and 1 examples, of different token counts: the mean is over tokens, not batches
    loss = train_sft.val_loss_of(model, examples, tokenizer, 2, "cpu", nullcontext())
    batch = data.collate(examples, tokenizer.pad_id)
    with torch.no_grad():
        logits, _ = model(batch["input_ids"])
    expected = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)
    assert loss == pytest.approx(expected.item(), rel=1e-5)
    assert model.training  # left as it was


def test_dtype_auto_is_float32_on_the_cpu_and_bfloat16_autocasts():
    sys.path.insert(0, str(ROOT))
    import train_sft

    a, b = torch.randn(4, 8), torch.randn(8, 4)
    with train_sft.autocast_context("cpu", "auto"):
        assert (a @ b).dtype == torch.float32
    with train_sft.autocast_context("cpu", "bfloat16"):
        assert (a @ b).dtype == torch.bfloat16


def test_held_out_documents_far_over_their_share_are_noted():
    import train_sft

    note = train_sft.held_out_note(n_train=19, n_val=1, n_train_examples=60, n_val_examples=40)
    assert note.startswith("note: the documents held out for validation (1 document, 5%) hold 40% of the "
                           "examples: documents are held out whole")
    assert train_sft.held_out_note(19, 1, 90, 10) is None  # within twice the documents' share
    assert train_sft.held_out_note(7, 1, 7, 1) is None  # 8 examples, one held out: as many as documents


def test_the_loss_is_a_mean_over_the_global_batchs_trained_tokens(tmp_path, monkeypatch):
    # sft_loss weighs each trained token by `scale`: 1 / (the batch's trained tokens), so
    # that the loss is their mean (not a mean over rows, nor a sum)
    import train_sft
    from minalign.data import IGNORE_INDEX

    seen, sft_loss = [], train_sft.sft_loss

    def spy(model, batch, scale):
        if model.training:  # the training steps, not the validation loss
            seen.append(float(scale) * (batch["labels"] != IGNORE_INDEX).sum().item())
        return sft_loss(model, batch, scale)

    monkeypatch.setattr(train_sft, "sft_loss", spy)
    result = run_script("train_sft.py", [*TINY, "--max-steps", "2", "--out-dir", tmp_path])
    assert result.returncode == 0, result.output()
    assert seen == pytest.approx([1.0, 1.0])
