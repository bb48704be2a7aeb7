"""DPO's log-prob plumbing, and tiny end-to-end runs of train_rm.py and train_dpo.py."""

import contextlib
import dataclasses
import io
import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch

from minalign import data
from minalign.cli import ArgumentError
from minalign.dpo import pair_logps, reference_logps
from minalign.dpo import uses_mean_logps
from minalign.model import GPT, GPTConfig
from minalign.tokenizer import get_tokenizer
from script_runs import as_in_a_new_process, run_script

ROOT = Path(__file__).resolve().parents[1]


def run(script, args, nproc=1):
    done = run_script(script, args, nproc)
    assert done.returncode == 0, done.output()
    return done.stdout


def metrics(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_pair_logps_match_one_sequence_at_a_time():
    tok = get_tokenizer("builtin")
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=32, block_size=48)).eval()
    raw = [{"prompt": "The plot was", "chosen": " great.", "rejected": " dull and far too long."},
           {"prompt": "I saw it", "chosen": " twice and loved it.", "rejected": " once."}]
    pairs, _ = data.tokenize_pairs(raw, tok, 48)
    batch = data.collate_pairs(pairs, tok.pad_id)
    sums, means = pair_logps(model, batch), pair_logps(model, batch, per_token=True)
    for i, (c, r) in enumerate(pairs):
        for side, ex in enumerate((c, r)):
            ids = torch.tensor([ex.input_ids])
            logp = model(ids)[0][0, :-1, : tok.vocab_size].log_softmax(-1)  # (T-1, V)
            targets = ids[0, 1:]
            want = logp.gather(1, targets[:, None])[ex.n_prompt - 1 :].sum()  # response tokens only
            torch.testing.assert_close(sums[side][i], want, atol=1e-4, rtol=1e-4)
            n_response = len(ex.input_ids) - ex.n_prompt
            torch.testing.assert_close(means[side][i], want / n_response, atol=1e-4, rtol=1e-4)
    for per_token, want in ((False, sums), (True, means)):
        ref = reference_logps(model, pairs, tok.pad_id, per_token, batch_size=1)  # (B, 2)
        torch.testing.assert_close(ref, torch.stack(want, 1).detach(), atol=1e-5, rtol=1e-5)


def test_reference_logps_take_no_dropout_and_give_the_mode_back():
    tok = get_tokenizer("builtin")
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=32, block_size=48, dropout=0.5))
    raw = [{"prompt": "The plot was", "chosen": " great.", "rejected": " dull and far too long."}]
    pairs, _ = data.tokenize_pairs(raw, tok, 48)
    ref = reference_logps(model.train(), pairs, tok.pad_id)  # (1, 2)
    assert model.training
    with torch.no_grad():
        want = torch.stack(pair_logps(model.eval(), data.collate_pairs(pairs, tok.pad_id)), 1)
    torch.testing.assert_close(ref, want)


def test_reference_logps_under_ddp_are_one_processs_batch_for_batch(monkeypatch):
    from minalign import dpo
    from minalign.distributed import DistInfo

    tok = get_tokenizer("builtin")
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=32, block_size=48)).eval()
    raw = [{"prompt": f"The plot was{' very' * i}", "chosen": " great." * (i % 3 + 1), "rejected": " dull."}
           for i in range(7)]
    pairs, _ = data.tokenize_pairs(raw, tok, 48)
    alone = reference_logps(model, pairs, tok.pad_id, batch_size=2)  # batches of pairs 0-1, 2-3, 4-5, 6
    monkeypatch.setattr(dpo, "all_reduce_sum", lambda x, info: x)  # each process's own part
    parts = [reference_logps(model, pairs, tok.pad_id, batch_size=2, dist=DistInfo(rank=r, world_size=3))
             for r in range(3)]
    assert [sorted({i for i, row in enumerate(p) if row.any()}) for p in parts] == [[0, 1, 6], [2, 3], [4, 5]]
    assert torch.equal(sum(parts), alone)  # the same batches: the same numbers, bit for bit


def test_dpo_metrics_by_hand():
    import train_dpo
    from minalign.reference import DPOLoss

    out = DPOLoss(torch.tensor([0.5, 0.7, 0.9]), torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.0, 2.0, 5.0]))
    got = train_dpo.dpo_metrics(out, torch.tensor([-4.0, -6.0, -8.0]), torch.tensor([-1.0, -2.0, -6.0]))
    want = {"loss": 0.7, "rewards/chosen": 2.0, "rewards/rejected": 7 / 3,
            "rewards/accuracies": 1 / 3,  # a tie is not a win
            "rewards/margins": -1 / 3, "logps/chosen": -6.0, "logps/rejected": -3.0}
    assert got == pytest.approx(want)


def test_held_out_margin_is_in_the_normalised_units_the_checkpoint_scores_in():
    sys.path.insert(0, str(ROOT))
    import train_rm

    from minalign.reward import RewardModel, accuracy_and_margin, score_pairs

    tok = get_tokenizer("builtin")
    torch.manual_seed(0)
    rm = RewardModel(GPTConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=32, block_size=48))
    raw = [{"prompt": "The plot was", "chosen": f" great{'!' * k}", "rejected": f" dull{'.' * k}"} for k in range(8)]
    pairs, _ = data.tokenize_pairs(raw, tok, 48)
    train_pairs, test_pairs = pairs[:6], pairs[6:]
    args = train_rm.Args(data="pairs.jsonl")  # not the built-in task: no Bayes-optimal figure
    train_rm.normalise(rm, tok, train_pairs, "cpu")
    results = train_rm.held_out_accuracy(args, rm, tok, test_pairs, raw[6:], "cpu")
    chosen, rejected = score_pairs(rm, train_pairs, tok.pad_id, "cpu")
    scores = torch.cat([chosen, rejected])  # normalised over the training pairs' responses
    assert abs(scores.mean().item()) < 1e-4 and scores.std().item() == pytest.approx(1.0, abs=1e-4)
    want = accuracy_and_margin(rm, test_pairs, tok.pad_id, "cpu")  # measured now, after the normalisation
    assert (results["accuracy"], results["margin"]) == pytest.approx(want)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A tiny SFT policy, trained once for the runs below."""
    work = tmp_path_factory.mktemp("pipeline")
    run("train_sft.py", ["--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "40",
                         "--batch-size", "16", "--max-steps", "60", "--eval-interval", "1000",
                         "--num-samples", "1", "--out-dir", str(work / "sft")])
    return work


SMALL = ["--n-train-prompts", "40", "--n-test-prompts", "16", "--max-length", "40", "--batch-size", "16",
         "--log-interval", "1", "--warmup-steps", "2"]


@pytest.mark.slow
def test_train_rm_learns_the_pairs(workdir):
    out = run("train_rm.py", [*SMALL, "--sft-dir", str(workdir / "sft"), "--pairs-dir", str(workdir / "pairs"),
                              "--out-dir", str(workdir / "rm"), "--epochs", "4", "--lr", "1e-3"])
    assert "eval/accuracy" in out and "gold_correlation" in out
    rows = [r for r in metrics(workdir / "rm" / "metrics.jsonl") if "loss" in r]
    first, last = sum(r["loss"] for r in rows[:3]) / 3, sum(r["loss"] for r in rows[-3:]) / 3
    assert last < first
    assert {"accuracy", "margin", "mean_reward", "min_reward", "max_reward", "grad_norm"} <= rows[-1].keys()
    assert all(r["grad_norm"] > 0 for r in rows)  # before clipping, as SFT and DPO log it
    ckpt = torch.load(workdir / "rm" / "ckpt.pt", weights_only=True)
    assert ckpt["kind"] == "reward" and ckpt["model"]["gain"].item() > 0
    result = json.loads((workdir / "rm" / "eval.json").read_text())
    assert result["accuracy"] == ckpt["results"]["accuracy"]
    logged = metrics(workdir / "rm" / "metrics.jsonl")[-1]  # the same evaluation, under eval/
    assert logged == {"step": logged["step"], "time": logged["time"], **{f"eval/{k}": v for k, v in result.items()}}
    assert {"eval/gold_correlation", "eval/train_seconds"} <= logged.keys()
    cached = [json.loads(l) for l in (workdir / "pairs" / "ranked" / "train.jsonl").read_text().splitlines()]
    assert cached and {"prompt", "chosen", "rejected"} <= cached[0].keys()


@pytest.mark.slow
def test_train_dpo_lowers_the_loss_and_evaluates(workdir):
    out = run("train_dpo.py", [*SMALL, "--sft-dir", str(workdir / "sft"), "--pairs-dir", str(workdir / "pairs"),
                               "--out-dir", str(workdir / "dpo"), "--epochs", "4", "--lr", "1e-3",
                               "--eval-max-new-tokens", "24"])
    assert "win rate" in out and "KL (nats)" in out
    rows = [r for r in metrics(workdir / "dpo" / "metrics.jsonl") if "loss" in r]
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=0.02)  # policy == reference at the start
    # ... to rounding: the cached reference log-probs are the policy's own at step 1, in the same mode
    assert rows[0]["rewards/chosen"] == pytest.approx(0, abs=1e-5) and rows[0]["rewards/rejected"] == pytest.approx(
        0, abs=1e-5)
    assert sum(r["loss"] for r in rows[-3:]) / 3 < math.log(2) - 0.02
    keys = {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
            "logps/rejected", "response_length"}
    assert keys <= rows[-1].keys()
    result = json.loads((workdir / "dpo" / "eval.json").read_text())
    assert result["kl"] > 0 and result["n_prompts"] == 16 and len(result["samples"]) == 16  # it moved away
    logged = metrics(workdir / "dpo" / "metrics.jsonl")[-1]  # the same evaluation, under eval/
    assert logged == {"step": logged["step"], "time": logged["time"],
                      **{f"eval/{k}": v for k, v in result.items() if k != "samples"}}
    assert {"rewards/accuracies", "loss", "gold_reward", "train_seconds"} <= result.keys()
    wins = [1.0 if s["gold"] > s["ref_gold"] else 0.5 if s["gold"] == s["ref_gold"] else 0.0 for s in result["samples"]]
    assert result["win_rate"] == pytest.approx(sum(wins) / 16)


@pytest.mark.slow
def test_dpo_first_step_gradient_scales_as_beta_label_smoothing_and_the_loss_type_say(workdir, tmp_path):
    # At the first step the policy is the reference: h = 0 for every pair, and the
    # gradient is dL/dh (a constant) times that of the margins, as each loss's formula
    # gives it: -beta / 2 for DPO, -beta (1 - 2e) / 2 with label smoothing e, -beta / 2 /
    # (1 - 2e) for robust DPO. So the flags must scale the logged gradient norm by it.
    def first_grad_norm(name, *flags):
        run("train_dpo.py", [*SMALL, "--sft-dir", str(workdir / "sft"), "--pairs-dir", str(workdir / "pairs"),
                             "--out-dir", str(tmp_path / name), "--epochs", "2", "--stop-at", "1", "--eval-max-new-tokens", "24",
                             *flags])
        return metrics(tmp_path / name / "metrics.jsonl")[0]["grad_norm"]

    base = first_grad_norm("base")  # beta 0.1
    smoothed = first_grad_norm("smoothed", "--beta", "0.2", "--label-smoothing", "0.3")
    robust = first_grad_norm("robust", "--beta", "0.2", "--loss-type", "robust", "--label-smoothing", "0.3")
    assert smoothed / base == pytest.approx(2 * 0.4, rel=1e-3)
    assert robust / base == pytest.approx(2 / 0.4, rel=1e-3)


@pytest.mark.slow
def test_the_reward_models_margin_and_centring_each_reach_its_loss(workdir, tmp_path):
    # one step from the same model and batch: a margin (the gold gap times it) and a
    # centring penalty each raise the loss, which without them is the plain Bradley-Terry one
    def first_loss(name, *flags):
        run("train_rm.py", [*SMALL, "--sft-dir", str(workdir / "sft"), "--pairs-dir", str(workdir / "pairs"),
                            "--out-dir", str(tmp_path / name), "--stop-at", "1", *flags])
        return metrics(tmp_path / name / "metrics.jsonl")[0]["loss"]

    base = first_loss("base")
    assert first_loss("margin", "--margin", "1") > base
    assert first_loss("centred", "--center-coef", "1") > base


@pytest.mark.slow
@pytest.mark.parametrize("script,evaluation", [("train_rm", "gold_correlation"), ("train_dpo", "held_out_metrics")])
def test_an_evaluation_that_fails_is_finished_by_resume(workdir, tmp_path, monkeypatch, capsys, script, evaluation):
    sys.path.insert(0, str(ROOT))
    import importlib

    from minalign.checkpoint import load_checkpoint
    from minalign.cli import parse_args

    module = importlib.import_module(script)

    def fails(*args, **kwargs):
        raise RuntimeError("the evaluation failed")

    monkeypatch.setattr(module, evaluation, fails)
    flags = [*SMALL, "--sft-dir", str(workdir / "sft"), "--pairs-dir", str(workdir / "pairs"),
             "--out-dir", str(tmp_path), "--epochs", "1"]
    if script == "train_dpo":
        flags += ["--eval-max-new-tokens", "24"]  # room in the tiny policy's block
    args = parse_args(module.Args, flags)
    with pytest.raises(RuntimeError, match="the evaluation failed"):
        module.main(args)
    ckpt = load_checkpoint(tmp_path / "ckpt.pt")  # the last step's, to resume from
    assert "resume" in ckpt and ckpt["step"] == metrics(tmp_path / "metrics.jsonl")[-1]["step"]
    assert not (tmp_path / "eval.json").exists() and "eval/" not in (tmp_path / "metrics.jsonl").read_text()
    monkeypatch.undo()
    capsys.readouterr()
    module.main(parse_args(module.Args, ["--resume", "--out-dir", str(tmp_path)]))
    assert (f"resumed from {tmp_path / 'ckpt.pt'} at step {ckpt['step']} of {ckpt['step']}: training is done, "
            "the final evaluation is left") in capsys.readouterr().out
    final = load_checkpoint(tmp_path / "ckpt.pt")
    assert "resume" not in final and final["step"] == ckpt["step"]
    assert all(torch.equal(final["model"][k], v) for k, v in ckpt["model"].items() if k not in ("gain", "offset"))
    result = json.loads((tmp_path / "eval.json").read_text())
    rows = metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows if "eval/loss" in r or "eval/accuracy" in r] == [ckpt["step"]]  # once
    assert rows[-1] == {"step": ckpt["step"], "time": rows[-1]["time"],
                        **{f"eval/{k}": v for k, v in result.items() if k != "samples"}}


@pytest.mark.slow
@pytest.mark.parametrize("script", ["train_rm.py", "train_dpo.py"])
def test_two_processes_train_as_one(workdir, script, tmp_path):
    common = [*SMALL, "--sft-dir", str(workdir / "sft"), "--pairs-dir", str(workdir / "pairs"), "--epochs", "1",
              "--lr", "1e-3", *(["--eval-max-new-tokens", "24"] if script == "train_dpo.py" else [])]
    run(script, [*common, "--out-dir", str(tmp_path / "one")])
    run(script, [*common, "--out-dir", str(tmp_path / "two")], nproc=2)  # each process half of each batch
    # Compared by what the models compute, not weight by weight: a weight whose true gradient
    # is 0 (the attention's key bias; the reward head's bias, as the Bradley-Terry loss sees
    # only differences) takes Adam steps of rounding noise, which differs, and so do the
    # reward model's absolute scores.
    left_out = ("time", "seconds", "per_s", "mean_reward", "min_reward", "max_reward")
    one, two = ([{k: v for k, v in r.items() if not k.endswith(left_out)} for r in metrics(tmp_path / n / "metrics.jsonl")]
                for n in ("one", "two"))
    assert len(one) == len(two) > 5 and [r.keys() for r in one] == [r.keys() for r in two]
    for a, b in zip(one, two):  # every step's loss and the evaluation, of the global batch
        assert a == pytest.approx(b, rel=1e-4, abs=1e-5)


def test_under_torchrun_a_mistake_is_reported_once(tmp_path):
    bad = tmp_path / "pairs.jsonl"
    bad.write_text('{"prompt": "a", "chosen": " b", "rejected": " c"}\nnot json\n')
    for args, says in ((["--data", str(bad)], f"{bad}:2: malformed JSON"), (["--beta", "-1"], "--beta -1")):
        result = run_script("train_dpo.py", [*args, "--out-dir", tmp_path / "out"], nproc=2, timeout=120)
        assert result.returncode != 0 and result.stderr.count(says) == 1, result.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("script", ["train_rm.py", "train_dpo.py"])
def test_a_diverged_run_stops_with_one_line_and_saves_nothing(workdir, script, tmp_path):
    from minalign.checkpoint import save_checkpoint

    # an earlier run's results: replaced as training starts, so none is left beside this run's metrics
    save_checkpoint(tmp_path / "ckpt.pt", {"model": {}, "model_config": {}, "args": {}, "stage": script[6:-3]})
    (tmp_path / "eval.json").write_text("{}")
    result = run_script(script, [*SMALL, "--sft-dir", workdir / "sft", "--pairs-dir", workdir / "pairs", "--epochs", "1",
                                 "--lr", "1e30", "--out-dir", tmp_path,
                                 *(["--eval-max-new-tokens", "24"] if script == "train_dpo.py" else [])])
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "training diverged" in result.stderr.strip().splitlines()[-1]
    assert "replacing the earlier run" in result.stdout
    assert not (tmp_path / "ckpt.pt").exists() and not (tmp_path / "eval.json").exists()


def test_a_read_only_folder_of_finished_upstream_results_is_only_read(tmp_path, read_only):
    from dataclasses import asdict

    import train_dpo
    from conftest import listing
    import train_rm
    import train_sft
    from minalign.checkpoint import save_checkpoint
    from minalign.distributed import DistInfo

    tok = get_tokenizer("builtin")
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=32, block_size=48)
    shared = tmp_path / "shared"  # finished SFT policy, reward model and pairs: read-only below
    save_checkpoint(shared / "sft" / "ckpt.pt", {
        "model": GPT(config).state_dict(), "model_config": asdict(config), "stage": "sft", "step": 1,
        "args": {"max_steps": 1, "data": None}, "tokenizer": tok.name})
    save_checkpoint(shared / "rm" / "ckpt.pt", {"model": {}, "model_config": {}, "stage": "rm", "args": {}})
    args = train_dpo.Args(sft_dir=str(shared / "sft"), pairs_dir=str(shared / "pairs"), out_dir=str(tmp_path / "dpo"),
                          n_train_prompts=3, n_test_prompts=2, max_length=40, batch_size=2)
    made = train_rm.prepare_pairs(args, DistInfo())[2:]  # the pairs are made while the folder can be written

    read_only(shared)
    before = listing(shared)
    assert train_rm.prepare_pairs(args, DistInfo())[2:] == made  # SFT policy and pairs reused
    assert train_sft.ensure(str(shared / "sft"), DistInfo()) == str(shared / "sft" / "ckpt.pt")
    assert train_rm.ensure(str(shared / "rm"), DistInfo()) == str(shared / "rm" / "ckpt.pt")
    assert listing(shared) == before  # nothing written
    with pytest.raises(ArgumentError, match=r"^--out-dir .*shared/dpo: cannot write there"):
        train_rm.prepare_pairs(dataclasses.replace(args, out_dir=str(shared / "dpo")), DistInfo())


def test_a_batch_larger_than_the_data_files_pairs_is_refused_before_sft(tmp_path):
    pairs = [{"prompt": "The plot", "chosen": f" was good {i}.", "rejected": " was bad."} for i in range(20)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    result = run_script("train_dpo.py", ["--data", tmp_path / "pairs.jsonl", "--sft-dir", tmp_path / "sft",
                                         "--out-dir", tmp_path / "dpo"])
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.endswith("--batch-size 32: " + str(tmp_path / "pairs.jsonl") + " leaves only 18 training "
                                  "pairs (2 held out by --test-fraction 0.1)\n")
    assert not (tmp_path / "sft").exists() and not (tmp_path / "dpo").exists()


def test_an_sft_policy_made_from_other_pairs_is_reused_only_when_named_and_never_from_another_split(
        tmp_path, monkeypatch):
    # The default folders are named after the data file, so two files of one name would
    # share them: the SFT policy records which pairs it came from.
    sys.path.insert(0, str(ROOT))
    import train_rm

    from minalign.checkpoint import file_fingerprint, save_checkpoint
    from minalign.cli import ArgumentError
    from minalign.distributed import DistInfo

    monkeypatch.chdir(tmp_path)
    pairs = [{"prompt": "The plot", "chosen": f" was good {i}.", "rejected": " was bad."} for i in range(20)]
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        rows = pairs if name == "a" else pairs[::-1]
        (tmp_path / name / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = GPT(GPTConfig(vocab_size=get_tokenizer("builtin").vocab_size, n_layer=1, n_head=2, n_embd=32,
                          block_size=64))
    save_checkpoint(tmp_path / "out" / "sft-pairs" / "ckpt.pt", {
        "model": model.state_dict(), "model_config": vars(model.config), "args": {}, "stage": "sft",
        "tokenizer": "builtin"})  # made from a's training pairs:
    made_from_a = {"data": str((tmp_path / "a" / "pairs.jsonl").resolve()), "sha256": file_fingerprint("a/pairs.jsonl"),
                   "seed": 1337, "test_fraction": 0.1}
    (tmp_path / "out" / "sft-pairs" / "source.json").write_text(json.dumps(made_from_a))
    on_b = train_rm.Args(data="b/pairs.jsonl", batch_size=8)
    with pytest.raises(ArgumentError, match=r"^out/sft-pairs holds an SFT policy made from the chosen responses of "
                                            r"other pairs \(.*a/pairs.jsonl\): pass --sft-dir out/sft-pairs to start "
                                            r"from it as it is"):
        train_rm.prepare_pairs(on_b, DistInfo())
    policy, *_ = train_rm.prepare_pairs(dataclasses.replace(on_b, sft_dir="out/sft-pairs"), DistInfo())  # named
    assert torch.equal(policy.wte.weight, model.wte.weight)
    # a's pairs split another way: some of the SFT data would be held out here, named or not
    on_a = train_rm.Args(data="a/pairs.jsonl", batch_size=8, seed=7, sft_dir="out/sft-pairs")
    with pytest.raises(ArgumentError, match=r"^--sft-dir out/sft-pairs holds an SFT policy trained on the chosen "
                                            r"responses of another split of these pairs \(seed 1337 there, 7 here\), "
                                            r"some of them held out here"):
        train_rm.prepare_pairs(on_a, DistInfo())


def test_an_sft_policy_trained_on_other_data_is_not_reused(tmp_path):
    # `python train_sft.py --data shakespeare.txt` used to write to out/sft, where the
    # later stages look for the built-in task's policy
    sys.path.insert(0, str(ROOT))
    import train_sft

    from minalign.checkpoint import save_checkpoint
    from minalign.cli import ArgumentError

    assert train_sft.Args().out_dir == "out/sft"  # and by default it no longer does
    assert train_sft.Args(data="data/shakespeare.txt").out_dir == "out/sft-shakespeare"
    assert train_sft.Args(data="data/pairs.test.jsonl.gz").out_dir == "out/sft-pairs.test"  # not out/sft-pairs
    text = str(tmp_path / "shakespeare.txt")
    fake = {"model": {}, "model_config": {}, "step": 5, "stage": "sft"}
    save_checkpoint(tmp_path / "sft" / "ckpt.pt", {**fake, "args": {"data": text, "max_steps": 5}})
    with pytest.raises(ArgumentError, match=r"trained on .*shakespeare.txt, not on the built-in task"):
        train_sft.ensure(str(tmp_path / "sft"), None)
    with pytest.raises(ArgumentError, match=r"trained on .*shakespeare.txt, not on .*other.jsonl"):
        train_sft.ensure(str(tmp_path / "sft"), None, data=str(tmp_path / "other.jsonl"))
    assert train_sft.ensure(str(tmp_path / "sft"), None, data=text) == str(tmp_path / "sft" / "ckpt.pt")
    save_checkpoint(tmp_path / "sft" / "ckpt.pt", {**fake, "args": {"data": None, "max_steps": 5}})
    assert train_sft.ensure(str(tmp_path / "sft"), None) == str(tmp_path / "sft" / "ckpt.pt")
    # a checkpoint of another stage, or none at all, is refused by name
    save_checkpoint(tmp_path / "sft" / "ckpt.pt", {**fake, "stage": "dpo", "args": {"data": None}})
    with pytest.raises(ArgumentError, match=r"--sft-dir .*: .*ckpt.pt holds a DPO policy, not an SFT policy"):
        train_sft.ensure(str(tmp_path / "sft"), None)
    (tmp_path / "sft" / "ckpt.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ArgumentError, match=r"ckpt.pt is not a readable checkpoint"):
        train_sft.ensure(str(tmp_path / "sft"), None)


def test_default_folders_say_what_went_in():
    sys.path.insert(0, str(ROOT))
    import train_dpo
    import train_rm

    folders = lambda args: (args.out_dir, args.sft_folder())
    assert folders(train_rm.Args()) == ("out/rm", "out/sft")
    assert folders(train_rm.Args(label_temperature=0.5)) == ("out/rm-t0.5", "out/sft")
    assert folders(train_dpo.Args(n_train_pairs=1000, label_flip=0.1)) == ("out/dpo-n1000-flip0.1", "out/sft")
    args = train_dpo.Args(data="x/harmless-base-test.jsonl.gz", out_dir="mine")
    assert folders(args) == ("mine", "out/sft-harmless-base-test")
    assert dataclasses.replace(args, seed=1).sft_dir is None  # still not named by the user


def test_pair_counts_the_built_in_prompts_cannot_give_are_refused_before_any_work():
    import train_dpo
    import train_rm

    train_rm.Args(n_train_prompts=10, n_train_pairs=60, batch_size=60)  # 4 samples a prompt: up to 6 pairs
    with pytest.raises(ArgumentError, match=r"^--n-train-pairs 61: --n-train-prompts 10 give at most 60 pairs; raise"):
        train_dpo.Args(n_train_prompts=10, n_train_pairs=61)
    with pytest.raises(ArgumentError, match=r"^--batch-size 33: more than the 32 training pairs at most$"):
        train_rm.Args(n_train_pairs=32, batch_size=33)
    with pytest.raises(ArgumentError, match=r"^--batch-size 61: more than the 60 training pairs at most$"):
        train_dpo.Args(n_train_prompts=10, batch_size=61)


def test_a_margin_from_gold_gaps_is_refused_with_noisy_labels():
    import train_rm

    assert train_rm.Args(margin=0.5).margin == 0.5  # ranked labels: every gold gap is positive
    for noise in ({"label_temperature": 0.5}, {"label_flip": 0.1}):  # a pair labelled against the judge has a
        with pytest.raises(ArgumentError, match=r"^--margin 0.5: with noisy labels"):  # negative gap
            train_rm.Args(margin=0.5, **noise)


def test_held_out_metrics_give_ipo_the_mean_log_probs_and_the_others_the_sums():
    sys.path.insert(0, str(ROOT))
    import train_dpo

    from minalign import ops

    tok = get_tokenizer("builtin")
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=32, block_size=48)).eval()
    raw = [{"prompt": "The plot was", "chosen": " great.", "rejected": " dull and far too long."},
           {"prompt": "I saw it", "chosen": " twice and loved it.", "rejected": " once."}]
    pairs, _ = data.tokenize_pairs(raw, tok, 48)
    batch = data.collate_pairs(pairs, tok.pad_id)
    for loss_type, per_token, ref in (("ipo", True, torch.tensor([[-3.0, -4.0], [-2.5, -2.0]])),
                                      ("sigmoid", False, torch.tensor([[-30.0, -40.0], [-20.0, -10.0]]))):
        assert uses_mean_logps(loss_type) == per_token
        args = train_dpo.Args(loss_type=loss_type, beta=0.5)
        got = train_dpo.held_out_metrics(model, pairs, ref, args, tok.pad_id, "cpu", batch_size=1)  # one pair a batch
        chosen, rejected = pair_logps(model, batch, per_token)
        out = ops.dpo_loss(chosen, rejected, ref[:, 0], ref[:, 1], 0.5, loss_type)
        want = train_dpo.dpo_metrics(out, chosen, rejected)  # TRL logs IPO's mean log-probs as logps/*
        assert got == pytest.approx(want, rel=1e-5)


def test_bad_data_ends_the_run_with_one_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a review"}\n{"text": 3}\n')
    result = run_script("train_sft.py", ["--data", bad, "--out-dir", tmp_path / "o"], own_process=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == f"train_sft.py: error: {bad}:2: 'text' must be a string, got int"


def test_what_the_builtin_task_cannot_feed_is_refused_before_any_work(tmp_path):
    sys.path.insert(0, str(ROOT))
    import train_dpo
    import train_ppo
    import train_rm

    from minalign.cli import ArgumentError, parse_args

    for cls, kwargs, message in (
            (train_dpo.Args, {"n_test_prompts": 1001}, "--n-test-prompts 1001: the built-in task's test split has 1,000"),
            (train_dpo.Args, {"n_train_prompts": 20_001}, "--n-train-prompts 20001: .* train split has 20,000"),
            (train_dpo.Args, {"max_length": 8}, "--max-length 8: .* up to 8 tokens"),
            (train_ppo.Args, {"eval_prompts": 1001}, "--eval-prompts 1001"),
            (train_ppo.Args, {"rollout_batch_size": 20_001}, "--rollout-batch-size 20001: at most the 20,000"),
            # 1,000 prompts give 6,000 pairs at most: 187 steps of 32 an epoch
            (train_dpo.Args, {"stop_at": 188}, r"--stop-at 188: the run ends by step 187 \(at most 6,000 pairs, "
                                               r"--batch-size 32, --epochs 1\)"),
            (train_rm.Args, {"stop_at": 55, "n_train_pairs": 400, "epochs": 4.5},  # 12 steps an epoch
             r"by step 54 \(at most 400 pairs, --batch-size 32, --epochs 4.5\)")):
        with pytest.raises(ArgumentError, match=message):
            cls(**kwargs)
    assert train_dpo.Args(n_test_prompts=1000, max_length=9).n_test_prompts == 1000  # the limits themselves pass
    assert train_dpo.Args(data="pairs.jsonl", max_length=4).max_length == 4  # --data brings its own prompts

    from minalign.distributed import DistInfo
    out = str(tmp_path / "out")
    for args, message in ((train_rm.Args(data="p.jsonl", margin=0.5, n_test_prompts=50, out_dir=out),
                           "--n-test-prompts, --margin: for the built-in task only"),
                          (train_dpo.Args(data="p.jsonl", eval_interval=5, out_dir=out), "--eval-interval: for the built-in"),
                          # named on the command line, at the default value too
                          (parse_args(train_dpo.Args, ["--data", "p.jsonl", "--n-train-prompts", "1000", "--out-dir", out]),
                           "--n-train-prompts: for the built-in task only"),
                          (parse_args(train_rm.Args, ["--test-fraction", "0.1", "--out-dir", out]),
                           "--test-fraction: applies to --data"),
                          (train_dpo.Args(out_dir=out, sft_dir=out), "--out-dir and --sft-dir both name"),
                          (train_rm.Args(out_dir=out, sft_dir=""), "--sft-dir '': empty")):
        with pytest.raises(ArgumentError, match=message):  # before the file is even read
            train_rm.prepare_pairs(args, DistInfo())
        assert not Path(args.out_dir).exists(), args.out_dir  # nor an output folder made


def test_a_split_left_empty_by_tokenizing_is_refused():
    sys.path.insert(0, str(ROOT))
    import train_rm

    from minalign.pairs import tokenize_splits

    tok = get_tokenizer("builtin")
    train_raw = [{"prompt": "The plot", "chosen": " was good.", "rejected": " was bad."}]
    test_raw = [{"prompt": "The plot", "chosen": " was good and long", "rejected": " was good and dull"}]
    args = train_rm.Args(data="p.jsonl", max_length=5)  # the test pair differs only past 5 tokens
    with pytest.raises(data.DataError, match=r"p.jsonl: no held-out pairs: none of the 1 is left: .* --max-length 5"):
        tokenize_splits(args, tok, train_raw, test_raw, is_main=False)
    train_pairs, test_pairs = tokenize_splits(train_rm.Args(data="p.jsonl"), tok, train_raw, test_raw, False)
    assert len(train_pairs) == len(test_pairs) == 1


def test_an_sft_policy_named_by_sft_dir_is_taken_as_it_is(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT))
    import train_rm

    from minalign.checkpoint import save_checkpoint
    from minalign.cli import ArgumentError
    from minalign.distributed import DistInfo

    pairs = [{"prompt": "The plot", "chosen": f" was good {i}.", "rejected": " was bad."} for i in range(20)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    model = GPT(GPTConfig(vocab_size=get_tokenizer("builtin").vocab_size, n_layer=1, n_head=2, n_embd=32,
                          block_size=64))
    ckpt = {"model": model.state_dict(), "model_config": vars(model.config), "args": {"data": "mine.txt"},
            "step": 1, "stage": "sft", "tokenizer": "builtin"}
    save_checkpoint(tmp_path / "mine" / "ckpt.pt", ckpt)
    args = train_rm.Args(data=str(tmp_path / "pairs.jsonl"), sft_dir=str(tmp_path / "mine"), batch_size=8)
    policy, _, train_raw, test_raw = train_rm.prepare_pairs(args, DistInfo())  # no SFT run: it is used as given
    assert torch.equal(policy.wte.weight, model.wte.weight) and len(train_raw) + len(test_raw) == 20
    # one found in the default folder (`train_sft.py --data pairs.txt` leaves it there) is
    # used only when named: another file of that name would share the folder
    monkeypatch.chdir(tmp_path)
    save_checkpoint(tmp_path / "out" / "sft-pairs" / "ckpt.pt", ckpt)
    with pytest.raises(ArgumentError, match=r"out/sft-pairs holds an SFT policy not made from these pairs: pass "
                                            r"--sft-dir out/sft-pairs to start from it"):
        train_rm.prepare_pairs(train_rm.Args(data="pairs.jsonl", batch_size=8), DistInfo())
    policy, _, _, _ = train_rm.prepare_pairs(train_rm.Args(data="pairs.jsonl", sft_dir="out/sft-pairs", batch_size=8),
                                             DistInfo())
    assert torch.equal(policy.wte.weight, model.wte.weight)
    with pytest.raises(ArgumentError, match="--max-length 65 exceeds the block size 64 of the model in .*mine"):
        train_rm.prepare_pairs(dataclasses.replace(args, max_length=65), DistInfo())  # it must fit the pairs
    save_checkpoint(tmp_path / "mine" / "ckpt.pt", {**ckpt, "stage": "dpo"})
    with pytest.raises(ArgumentError, match="holds a DPO policy, not an SFT policy"):
        train_rm.prepare_pairs(args, DistInfo())
    save_checkpoint(tmp_path / "mine" / "ckpt.pt", {**ckpt, "args": {"data": "mine.txt", "max_steps": 30}})
    with pytest.raises(ArgumentError, match=r"--sft-dir .*mine: its SFT run stopped at step 1 of 30: finish it "
                                            r"first, with `python train_sft.py --resume --out-dir .*mine`"):
        train_rm.prepare_pairs(args, DistInfo())  # not taken half-trained


def test_dpo_checks_room_for_its_evaluation_before_making_anything(tmp_path):
    sys.path.insert(0, str(ROOT))
    import train_dpo

    from minalign.cli import ArgumentError, parse_args

    args = parse_args(train_dpo.Args, ["--eval-max-new-tokens", "70", "--sft-dir", str(tmp_path / "sft"),
                                       "--pairs-dir", str(tmp_path / "pairs"), "--out-dir", str(tmp_path / "dpo")])
    with pytest.raises(ArgumentError, match=r"--eval-max-new-tokens 70: .* in the model's block of 64"):
        train_dpo.main(args)
    assert not any(tmp_path.iterdir())  # no SFT policy, pairs or output folder made


def test_only_ipo_compares_mean_logps():
    from minalign import ops

    assert [uses_mean_logps(t) for t in ops.DPO_LOSS_TYPES] == [t == "ipo" for t in ops.DPO_LOSS_TYPES]


def _sft_from_a(tmp_path, monkeypatch):
    from minalign.checkpoint import file_fingerprint, save_checkpoint
    from minalign.model import GPT, GPTConfig
    from minalign.tokenizer import get_tokenizer

    monkeypatch.chdir(tmp_path)
    pairs = [{"prompt": "The plot", "chosen": f" was good {i}.", "rejected": " was bad."} for i in range(20)]
    for name in ("a", "c"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    model = GPT(GPTConfig(vocab_size=get_tokenizer("builtin").vocab_size, n_layer=1, n_head=2, n_embd=32,
                          block_size=64))
    save_checkpoint(tmp_path / "out" / "sft-pairs" / "ckpt.pt", {
        "model": model.state_dict(), "model_config": vars(model.config), "stage": "sft", "step": 1,
        "args": {"data": "out/sft-pairs/sft_data.jsonl", "max_steps": 1}, "tokenizer": "builtin"})
    (tmp_path / "out" / "sft-pairs" / "source.json").write_text(json.dumps({
        "data": str((tmp_path / "a" / "pairs.jsonl").resolve()), "sha256": file_fingerprint("a/pairs.jsonl"),
        "seed": 1337, "test_fraction": 0.1}))
    return model


def test_sft_policy_of_a_moved_pairs_file_is_reused(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT))
    import train_rm
    from minalign.distributed import DistInfo

    model = _sft_from_a(tmp_path, monkeypatch)
    policy, *_ = train_rm.prepare_pairs(train_rm.Args(data="c/pairs.jsonl", batch_size=8), DistInfo())
    assert torch.equal(policy.wte.weight, model.wte.weight)


def test_sft_policy_of_another_test_fraction_is_refused(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT))
    import train_rm
    from minalign.cli import ArgumentError
    from minalign.distributed import DistInfo

    _sft_from_a(tmp_path, monkeypatch)
    with pytest.raises(ArgumentError, match=r"another split of these pairs \(test_fraction 0.1 there, 0.2 here\)"):
        train_rm.prepare_pairs(train_rm.Args(data="a/pairs.jsonl", batch_size=8, test_fraction=0.2,
                                             sft_dir="out/sft-pairs"), DistInfo())


@pytest.mark.slow
def test_ipo_starts_at_its_target_margin(workdir, tmp_path):
    run("train_dpo.py", [*SMALL, "--sft-dir", str(workdir / "sft"), "--pairs-dir", str(workdir / "pairs"),
                         "--out-dir", str(tmp_path / "ipo"), "--loss-type", "ipo", "--epochs", "1",
                         "--eval-max-new-tokens", "24", "--eval-interval", "0"])
    first = [r for r in metrics(tmp_path / "ipo" / "metrics.jsonl") if "loss" in r][0]
    assert first["rewards/margins"] == pytest.approx(0, abs=1e-4)  # policy == reference, in the same units
    assert first["loss"] == pytest.approx(1 / (4 * 0.1 ** 2), rel=1e-3)


@pytest.mark.slow
def test_dpo_resume_is_bit_for_bit_and_only_from_the_same_sft_policy(workdir, tmp_path, capsys):
    import re
    import shutil

    sys.path.insert(0, str(ROOT))
    import train_dpo

    from minalign.checkpoint import load_checkpoint, save_checkpoint
    from minalign.cli import parse_args

    common = [*SMALL, "--sft-dir", str(workdir / "sft"), "--pairs-dir", str(workdir / "pairs"), "--epochs", "2",
              "--lr", "1e-3", "--eval-interval", "4", "--eval-max-new-tokens", "16", "--save-interval", "4"]
    run("train_dpo.py", [*common, "--out-dir", str(tmp_path / "full")])
    run("train_dpo.py", [*common, "--out-dir", str(tmp_path / "split"), "--stop-at", "5"])
    ckpt = load_checkpoint(tmp_path / "split" / "ckpt.pt")
    assert ckpt["step"] == 5 and {"optimizer", "ref_train", "ref_test"} <= ckpt["resume"].keys()
    assert not (tmp_path / "split" / "eval.json").exists()
    with open(tmp_path / "split" / "metrics.jsonl", "a") as f:  # logged after the checkpoint, then cut short
        f.write(json.dumps({"step": 6, "loss": 123.0}) + "\n")

    other_sft = tmp_path / "other-sft"  # differs from the run's SFT policy in one weight
    shutil.copytree(workdir / "sft", other_sft)
    sft = load_checkpoint(other_sft / "ckpt.pt")
    sft["model"][next(iter(sft["model"]))] += 1e-3
    save_checkpoint(other_sft / "ckpt.pt", sft)
    for extra, message in ((["--sft-dir", str(other_sft)], f"the SFT policy in {other_sft} is not the one the run "
                                                           f"started from"),
                           (["--sft-dir", str(tmp_path / "moved")], f"--sft-dir {tmp_path / 'moved'} holds no "
                                                                    f"checkpoint"),
                           (["--beta", "0.5"], "--beta 0.5 (it has 0.1)"),
                           (["--stop-at", "5"], "--stop-at 5: the run in"),
                           (["--stop-at", "29"], "--stop-at 29: the run ends at step 28")):
        with pytest.raises(ArgumentError, match=re.escape(message)):
            train_dpo.main(parse_args(train_dpo.Args, ["--resume", "--out-dir", str(tmp_path / "split"), *extra]))
        assert capsys.readouterr().out == ""  # before any work: no pairs read or made, no SFT policy trained
    assert not (tmp_path / "moved").exists()

    out = run("train_dpo.py", ["--resume", "--out-dir", str(tmp_path / "split")])  # the rest from the checkpoint
    assert "resumed from" in out and "reference log-probs" not in out  # those are in the checkpoint
    timing = ("time", "steps_per_s", "eval/train_seconds")
    full, split = ([{k: v for k, v in r.items() if k not in timing} for r in metrics(tmp_path / n / "metrics.jsonl")]
                   for n in ("full", "split"))
    assert split == full and [r["step"] for r in split if "eval/gold_reward" in r][:3] == [0, 4, 8]
    left, right = (load_checkpoint(tmp_path / n / "ckpt.pt") for n in ("full", "split"))
    assert "resume" not in right and all(torch.equal(v, right["model"][k]) for k, v in left["model"].items())


@pytest.mark.slow
def test_a_reward_model_cut_short_is_resumed_bit_for_bit_also_by_the_stage_that_needs_it(workdir, tmp_path):
    from minalign.checkpoint import load_checkpoint

    common = [*SMALL, "--sft-dir", str(workdir / "sft"), "--pairs-dir", str(workdir / "pairs"), "--epochs", "2",
              "--lr", "1e-3", "--save-interval", "4"]
    run("train_rm.py", [*common, "--out-dir", str(tmp_path / "full")])
    for split in ("split", "needed"):
        run("train_rm.py", [*common, "--out-dir", str(tmp_path / split), "--stop-at", "6"])
        assert {"optimizer", "rng"} <= load_checkpoint(tmp_path / split / "ckpt.pt")["resume"].keys()
    out = run("train_rm.py", ["--resume", "--out-dir", str(tmp_path / "split")])
    assert "resumed from" in out and "step     7/" in out
    # train_ppo.py finds it in its --rm-dir: train_rm.ensure finishes it there, from train_ppo.py's --sft-dir
    import train_rm
    from minalign.distributed import DistInfo

    refusal = (f"--rm-dir {tmp_path / 'needed'} holds a reward model cut short, which this run would finish first: "
               f"--resume: --sft-dir {tmp_path / 'moved'} holds no checkpoint")
    with as_in_a_new_process(), pytest.raises(ArgumentError, match=re.escape(refusal)):
        train_rm.ensure(str(tmp_path / "needed"), DistInfo(), sft_dir=str(tmp_path / "moved"))
    with as_in_a_new_process(), contextlib.redirect_stdout(io.StringIO()) as out:  # the same sums as run()'s
        train_rm.ensure(str(tmp_path / "needed"), DistInfo(), sft_dir=str(workdir / "sft"))
    assert "resuming the run cut short" in out.getvalue()
    finished = [load_checkpoint(tmp_path / n / "ckpt.pt") for n in ("full", "split", "needed")]
    assert all("resume" not in c and c["results"]["accuracy"] == finished[0]["results"]["accuracy"]
               for c in finished)
    for ckpt in finished[1:]:
        assert all(torch.equal(v, ckpt["model"][k]) for k, v in finished[0]["model"].items())
    rows = [[{k: v for k, v in r.items() if k not in ("time", "eval/train_seconds")}
             for r in metrics(tmp_path / n / "metrics.jsonl")] for n in ("full", "split", "needed")]
    assert rows[0] == rows[1] == rows[2]
