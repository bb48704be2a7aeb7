"""The experiments' formulas (Gao et al.'s fits, best-of-n), the label flips and pair
subsets they train on, and a tiny run of each experiment end to end."""

import csv
import itertools
import math
from pathlib import Path

import numpy as np
import pytest

from experiments.common import best_of_n, bon_kl, fit_gao, frontier_at, gao_curve, upper_frontier
from minalign.preferences import select_pairs
from script_runs import run_script


@pytest.mark.parametrize("form,a,b", [("bon", 0.9, 0.2), ("rl", 0.5, 0.3), ("rl", 0.2, -0.05)])
def test_fit_gao_recovers_known_parameters(form, a, b):
    rng = np.random.default_rng(0)
    d = np.linspace(0.1, 4.0, 40)
    reward = gao_curve(d, a, b, form) + rng.normal(0, 0.01, d.shape)
    fit = fit_gao(np.concatenate([[0.0], d]), np.concatenate([[0.0], reward]), form)
    assert fit["a"] == pytest.approx(a, abs=0.02) and fit["b"] == pytest.approx(b, abs=0.02)
    assert fit["r2"] > 0.99
    if b > 0:  # the peak is where the derivative of the true curve vanishes
        true_peak = a / (2 * b) if form == "bon" else math.exp(a / b - 1)
        assert fit["d_peak"] == pytest.approx(true_peak, rel=0.05)
    else:
        assert "d_peak" not in fit


def test_fit_gao_reports_a_poor_fit_and_rejects_bad_input():
    d = np.linspace(0.1, 3, 30)
    fit = fit_gao(d, np.sin(6 * d), "bon")  # nothing like d (a - b d)
    assert fit["r2"] < 0.5
    with pytest.raises(ValueError, match="form"):
        fit_gao(d, d, "ppo")
    with pytest.raises(ValueError, match="two points"):
        fit_gao([0.0, 1.0], [0.0, 1.0], "rl")


def test_best_of_n_kl_formula():
    assert bon_kl(1) == 0.0
    assert bon_kl(2) == pytest.approx(math.log(2) - 0.5)
    # Exact KL of best-of-n over M equally likely outcomes with distinct rewards: the
    # outcome ranked i-th (ascending) is picked with probability (i/M)^n - ((i-1)/M)^n.
    # It never exceeds the formula and approaches it as M grows (the continuous limit).
    for n in (2, 4, 16, 64):
        for M, tol in ((50, None), (200_000, 1e-3)):
            i = np.arange(1, M + 1)
            p = (i / M) ** n - ((i - 1) / M) ** n
            p = p[p > 0]
            kl = float(np.sum(p * np.log(p * M)))
            assert kl <= bon_kl(n) + 1e-12
            if tol:
                assert kl == pytest.approx(bon_kl(n), abs=tol)


def test_best_of_n_equals_the_average_over_every_draw():
    rng = np.random.default_rng(1)
    proxy, gold = rng.normal(size=7), rng.normal(size=7)
    for n in range(1, 8):
        picks = [max(draw, key=lambda j: proxy[j]) for draw in itertools.combinations(range(7), n)]
        want = (np.mean(proxy[picks]), np.mean(gold[picks]))
        assert best_of_n(proxy, gold, n) == pytest.approx(want)
    assert best_of_n(proxy, gold, 1) == pytest.approx((proxy.mean(), gold.mean()))
    assert best_of_n(proxy, gold, 7)[1] == pytest.approx(gold[np.argmax(proxy)])
    with pytest.raises(ValueError, match="best-of-8"):
        best_of_n(proxy, gold, 8)


def test_upper_frontier():
    points = [(0.0, 0.1), (1.0, 0.5), (2.0, 0.4), (3.0, 0.7), (0.5, 0.05)]
    front = upper_frontier(points)
    assert front == [(0.0, 0.1), (1.0, 0.5), (3.0, 0.7)]
    assert frontier_at(front, 2.5) == 0.5 and frontier_at(front, 3.0) == 0.7 and frontier_at(front, -1) == -math.inf


def test_pair_counts_the_prompts_cannot_give_are_refused_before_any_proxy_is_trained():
    from experiments import overoptimization
    from minalign.cli import ArgumentError

    with pytest.raises(ArgumentError, match=r"^--pair-counts 7000: --n-train-prompts 1000 give at most 6000 pairs"):
        overoptimization.Args(pair_counts=(250, 7000))
    with pytest.raises(ArgumentError, match=r"^--batch-size 32: more than the 16 training pairs at most$"):
        overoptimization.Args(pair_counts=(16, 250))


def test_each_proxy_gets_at_least_rm_min_steps_steps():
    from experiments import overoptimization

    args = overoptimization.Args()  # 32 pairs a batch, 4 epochs, at least 150 steps
    steps = {n: int(overoptimization.proxy_epochs(args, n) * (n // args.batch_size)) for n in (250, 1000, 1100, 4000)}
    assert steps == {250: 150, 1000: 150, 1100: 150, 4000: 500}  # 4,000 pairs: 4 epochs of 125 steps
    for n in range(32, 2000, 7):  # never one short by a rounding
        assert int(overoptimization.proxy_epochs(args, n) * (n // 32)) >= 150


def test_select_pairs_subsets_and_flips_exactly():
    pairs = [{"prompt": f"p{i}", "chosen": f"good{i}", "rejected": f"bad{i}", "chosen_gold": 1.0,
              "rejected_gold": -1.0, "p_chosen": 0.9, "chosen_ended": True, "rejected_ended": False}
             for i in range(40)]
    subset, flipped = select_pairs(pairs, 20, 0.25, seed=3)
    assert len(subset) == 20 and flipped == 5 and len({p["prompt"] for p in subset}) == 20
    wrong = [p for p in subset if p.get("flipped")]
    assert len(wrong) == 5
    for p in wrong:
        assert p["chosen"].startswith("bad") and p["chosen_gold"] == -1.0 and p["p_chosen"] == pytest.approx(0.1)
        assert not p["chosen_ended"] and p["rejected_ended"]
    assert all(p["chosen"].startswith("good") for p in subset if not p.get("flipped"))
    assert pairs[0]["chosen"] == "good0" and "flipped" not in pairs[0]  # the input is left alone
    assert select_pairs(pairs, 20, 0.25, seed=3) == (subset, flipped)  # seeded
    assert select_pairs(pairs)[1] == 0 and len(select_pairs(pairs)[0]) == 40
    with pytest.raises(ValueError, match="41 pairs"):
        select_pairs(pairs, 41)
    with pytest.raises(ValueError, match="flipped"):
        select_pairs(pairs, flip=1.5)


def test_a_stage_is_reused_only_with_the_same_arguments_and_the_same_upstream_weights(tmp_path, capsys):
    from dataclasses import dataclass, replace

    import torch

    from experiments.common import run_stage
    from minalign.checkpoint import save_checkpoint

    @dataclass
    class StageArgs:
        out_dir: str
        sft_dir: str
        lr: float = 0.1

    def sft(value, seconds):  # the same weights saved twice differ in their other entries
        save_checkpoint(tmp_path / "sft" / "ckpt.pt", {"model": {"w": torch.full((2,), value)}, "seconds": seconds})

    runs = []

    def train(args):
        runs.append(args.lr)
        (Path(args.out_dir) / "ckpt.pt").parent.mkdir(parents=True, exist_ok=True)
        (Path(args.out_dir) / "ckpt.pt").write_text("weights")

    args = StageArgs(out_dir=str(tmp_path / "stage"), sft_dir=str(tmp_path / "sft"))
    sft(1.0, seconds=3)
    for stage_args, sft_value, ran in ((args, 1.0, True), (args, 1.0, False),  # reused
                                       (replace(args, lr=0.2), 1.0, True),  # other arguments
                                       (replace(args, lr=0.2), 2.0, True),  # the SFT policy trained again
                                       (replace(args, lr=0.2), 2.0, False)):
        if sft_value == 2.0:
            sft(2.0, seconds=len(runs))  # bytes change every time; the weights only once
        before = len(runs)
        assert run_stage("stage", train, stage_args) == Path(stage_args.out_dir)
        assert (len(runs) > before) == ran
    assert "done before, reusing" in capsys.readouterr().out


def test_a_stage_cut_short_resumes_from_its_checkpoint_unless_its_arguments_changed(tmp_path, capsys):
    from dataclasses import dataclass, replace

    from experiments.common import run_stage
    from minalign.checkpoint import save_checkpoint
    from minalign.cli import ArgumentError

    @dataclass
    class StageArgs:
        out_dir: str
        lr: float = 0.1
        resume: bool = False

    calls = []

    def train(args, cut_short=False):
        calls.append((args.lr, args.resume))
        if not args.resume:
            assert not (Path(args.out_dir) / "ckpt.pt").exists()  # a fresh start in a cleared folder
        save_checkpoint(Path(args.out_dir) / "ckpt.pt", {"model": {}, "step": 1, **({"resume": {}} if cut_short else {})})
        if cut_short:
            raise KeyboardInterrupt

    args = StageArgs(out_dir=str(tmp_path / "stage"))
    with pytest.raises(KeyboardInterrupt):
        run_stage("stage", lambda a: train(a, cut_short=True), args)
    run_stage("stage", train, args)  # goes on from the checkpoint
    assert calls[-1] == (0.1, True) and "cut short before, resuming" in capsys.readouterr().out
    assert run_stage("stage", train, args) and len(calls) == 2  # finished: reused
    with pytest.raises(KeyboardInterrupt):
        run_stage("stage", lambda a: train(a, cut_short=True), replace(args, lr=0.2))
    run_stage("stage", train, replace(args, lr=0.3))  # other arguments: trained afresh
    assert calls[-1] == (0.3, False) and not (tmp_path / "stage" / "started.json").read_text().count('"lr": 0.2')

    def refuses_to_resume(args):  # as a script does whose upstream models have changed
        if args.resume:
            raise ArgumentError("--resume: the SFT policy in out/sft is not the one the run started from")
        train(args)

    with pytest.raises(KeyboardInterrupt):
        run_stage("stage", lambda a: train(a, cut_short=True), replace(args, lr=0.4))
    run_stage("stage", refuses_to_resume, replace(args, lr=0.4))
    assert calls[-1] == (0.4, False) and "cannot resume (--resume: the SFT policy" in capsys.readouterr().out


# ---- tiny runs of each experiment ----

TINY = ["--n-train-prompts", "40", "--n-test-prompts", "8", "--max-length", "40", "--batch-size", "16",
        "--rollout-batch-size", "16", "--max-new-tokens", "16"]


def run(module, work, args):
    result = run_script(f"experiments/{module}.py", ["--out-dir", work / "exp", "--sft-dir", work / "sft",
                                                     "--pairs-dir", work / "pairs", *TINY, *args])
    assert result.returncode == 0, result.output()
    return result.stdout


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def has_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A tiny SFT policy, trained once for the runs below."""
    work = tmp_path_factory.mktemp("experiments")
    result = run_script("train_sft.py", ["--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "64",
                                         "--batch-size", "16", "--max-steps", "60", "--eval-interval", "1000",
                                         "--num-samples", "1", "--out-dir", work / "sft"])
    assert result.returncode == 0, result.output()
    return work


@pytest.mark.slow
def test_frontier_tiny_run(work):
    args = ["--rm-dir", str(work / "rm"), "--dpo-betas", "0.1", "1", "--dpo-epochs", "1", "--dpo-eval-interval", "4",
            "--ppo-kl-coefs", "0.05", "--ppo-updates", "2", "--ppo-eval-interval", "1"]
    out = run("frontier", work, args)
    folder = work / "exp" / "frontier"
    rows = read_csv(folder / "frontier.csv")
    for method, setting, n_points in (("DPO", "0.1", None), ("DPO", "1.0", None), ("PPO", "0.05", 3)):
        mine = [r for r in rows if r["method"] == method and r["beta"] == setting]
        steps = [int(r["step"]) for r in mine]
        assert steps[0] == 0 and steps == sorted(set(steps)) and len(steps) >= 3  # along the run, in order
        assert float(mine[0]["kl"]) == pytest.approx(0, abs=1e-4)  # before training the policy is the reference
        if n_points:
            assert len(steps) == n_points  # updates 0, 1 and 2
    assert "DPO's frontier is higher at" in out and (folder / "summary.txt").exists()
    assert (folder / "frontier.png").exists() == has_matplotlib()
    again = run("frontier", work, args)  # finished runs are reused, not repeated
    assert again.count("done before, reusing") == 3 and read_csv(folder / "frontier.csv") == rows


@pytest.mark.slow
def test_overoptimization_tiny_run(work):
    out = run("overoptimization", work, ["--pair-counts", "48", "96", "--rm-min-steps", "3", "--ppo-updates", "2",
                                         "--ppo-eval-interval", "1", "--bon-prompts", "2", "--bon-max-n", "8"])
    folder = work / "exp" / "overoptimization"
    bon = read_csv(folder / "bon.csv")
    assert [int(r["n"]) for r in bon] == [1, 2, 4, 8] * 2
    for r in bon:
        assert float(r["kl"]) == pytest.approx(bon_kl(int(r["n"])))
    proxy = [float(r["proxy"]) for r in bon if r["n_pairs"] == "48"]
    assert proxy == sorted(proxy)  # picking by the proxy raises the proxy's expected score with n
    rl = read_csv(folder / "rl.csv")
    assert {r["n_pairs"] for r in rl} == {"48", "96"} and {"proxy", "gold", "d"} <= rl[0].keys()
    assert {r["method"] for r in read_csv(folder / "fits.csv")} >= {"bon"}
    assert "The proxy's favourite samples" in (folder / "samples.md").read_text()
    assert "training on 48 pairs" in out and "training on 96 pairs" in out
    assert (folder / "overoptimization.png").exists() == has_matplotlib()


@pytest.mark.slow
def test_label_noise_tiny_run(work):
    out = run("label_noise", work, ["--flips", "0", "0.5", "--ppo-updates", "1"])
    rows = read_csv(work / "exp" / "label_noise" / "label_noise.csv")
    assert [float(r["flip"]) for r in rows] == [0.0, 0.5]
    assert all(0 <= float(r["rm_accuracy"]) <= 1 and 0 <= float(r["dpo_win_rate"]) <= 1 for r in rows)
    line = next(l for l in out.splitlines() if l.startswith("training on"))  # flip 0.5 only
    n, wrong = int(line.split()[2]), int(line.split()[4])
    assert wrong == round(n / 2)  # half the training labels flipped, exactly
    assert (work / "exp" / "label_noise" / "label_noise.png").exists() == has_matplotlib()


@pytest.mark.parametrize("name", ["frontier", "overoptimization", "label_noise"])
def test_an_experiment_refuses_cpu_kernels_it_cannot_have_before_any_stage(name, tmp_path, monkeypatch):
    # A stage cut short is resumed; one refused on resume is made again from scratch, so a
    # refusal that is not about the stage must come before any of them.
    import importlib

    from minalign import ops
    from minalign.cli import ArgumentError

    module = importlib.import_module(f"experiments.{name}")

    def unavailable():
        raise ValueError("MINALIGN_CPU_BLOCKS=sse: must be avx512, avx2 or baseline")
    monkeypatch.setattr(ops, "cpu_kernels", unavailable)
    monkeypatch.setattr(module, "run_stage", lambda *args, **kwargs: pytest.fail("a stage ran"), raising=False)
    with pytest.raises(ArgumentError, match="^MINALIGN_CPU_BLOCKS=sse"):
        module.main(module.Args(out_dir=str(tmp_path)))
    assert not any(tmp_path.iterdir())
