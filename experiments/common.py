"""What the experiments share: their common arguments, cached stages, the metrics they
read back, CSV and plots, and the formulas of Gao et al. (2022).

Each experiment is a sequence of ordinary training runs (train_rm.py, train_dpo.py,
train_ppo.py, called in-process with their own Args), each in its own folder under
the experiment's out_dir. A finished stage leaves `done.json` holding its arguments;
running the experiment again reuses every stage whose arguments are unchanged, and
continues a stage that was cut short from its last checkpoint, so an interrupted sweep
resumes where it stopped and a plot can be redrawn for free.
"""

import csv
import json
import math
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from minalign import data, task
from minalign.checkpoint import load_checkpoint, weights_fingerprint
from minalign.cli import ArgumentError, check_args


@dataclass
class ExperimentArgs:
    """Settings every experiment shares: where things live and the size of the task."""

    out_dir: str = "out/experiments"
    """Parent folder of the experiment's own folder (runs, CSV, PNG)."""
    sft_dir: str = "out/sft"
    """SFT policy: the starting point and reference of every run (trained there if absent)."""
    pairs_dir: str = "out/pairs"
    """Cache of the built-in task's preference pairs (made there if absent)."""
    n_train_prompts: int = 1000
    """Training prompts of the preference pairs (4 samples each, up to 6 pairs)."""
    n_test_prompts: int = 200
    """Held-out prompts: the preference pairs' test split, and every gold evaluation."""
    max_length: int = 64
    """Longest prompt + response of a preference pair, in tokens."""
    batch_size: int = 32
    """Pairs per step of the reward-model and DPO runs."""
    rollout_batch_size: int = 64
    """PPO: prompts sampled per update (and the minibatch size)."""
    max_new_tokens: int = 40
    """Longest sampled response, in PPO and in every evaluation."""
    seed: int = 1337
    """Random seed of every run."""
    device: str = "auto"
    """"auto" (CUDA if available), "cpu", "cuda" or "cuda:N"."""

    def __post_init__(self):
        check_args(self, positive=("n_train_prompts", "n_test_prompts", "max_length", "batch_size",
                                   "rollout_batch_size", "max_new_tokens"))
        task.check_counts(self, train=("n_train_prompts",), test=("n_test_prompts",), max_length=("max_length",))

    def pair_settings(self) -> dict:
        """Keyword arguments of train_rm.Args / train_dpo.Args that these settings fix."""
        return dict(sft_dir=self.sft_dir, pairs_dir=self.pairs_dir, n_train_prompts=self.n_train_prompts,
                    n_test_prompts=self.n_test_prompts, max_length=self.max_length, batch_size=self.batch_size,
                    seed=self.seed, device=self.device)

    def ppo_settings(self) -> dict:
        """Keyword arguments of train_ppo.Args that these settings fix."""
        return dict(sft_dir=self.sft_dir, rollout_batch_size=self.rollout_batch_size,
                    minibatch_size=self.rollout_batch_size, max_new_tokens=self.max_new_tokens,
                    eval_prompts=self.n_test_prompts, seed=self.seed, device=self.device)


def model_fingerprints(checkpoints: dict) -> dict:
    """{name: fingerprint of the weights} of the checkpoints ({name: path}) that exist."""
    return {name: weights_fingerprint(load_checkpoint(path)["model"])
            for name, path in checkpoints.items() if Path(path).exists()}


def run_stage(name: str, run, stage_args) -> Path:
    """Run one training stage (`run(stage_args)`) unless its folder already holds a
    finished run with the same arguments, started from the same models (the weights in
    its --sft-dir and --rm-dir, which an earlier stage may have trained again); returns
    the folder. A run with the same arguments that was cut short (Ctrl-C, a crash) goes
    on from its last checkpoint with --resume, unless the script refuses that (its
    models have changed since).

    A stale folder is cleared first: nothing of an older run is kept."""
    out = Path(stage_args.out_dir)
    done, started = out / "done.json", out / "started.json"
    upstream = {field: Path(getattr(stage_args, field)) / "ckpt.pt" for field in ("sft_dir", "rm_dir")
                if getattr(stage_args, field, None)}
    arguments = json.loads(json.dumps(asdict(stage_args)))  # tuples -> lists, as stored

    def stage_record() -> dict:  # a function: the upstream models may only exist once run() is done
        return {"args": arguments, "started_from": model_fingerprints(upstream)}

    def holds(path, record: dict) -> bool:
        try:
            return path.exists() and data.read_record(path) == record
        except data.DataError:  # damaged: run again
            return False

    def cut_short() -> bool:  # with a checkpoint that holds the state to resume from
        try:
            return (out / "ckpt.pt").exists() and "resume" in load_checkpoint(out / "ckpt.pt")
        except ArgumentError:  # damaged: run again
            return False

    if holds(done, stage_record()):
        print(f"== {name}: done before, reusing {out}", flush=True)
        return out
    resumed = False
    if hasattr(stage_args, "resume") and holds(started, {"args": arguments}) and cut_short():
        print(f"== {name}: cut short before, resuming {out}", flush=True)
        try:
            run(replace(stage_args, resume=True))
            resumed = True
        except ArgumentError as refused:  # its models have changed: it cannot go on as it started
            print(f"== {name}: cannot resume ({refused}); starting it again", flush=True)
    if not resumed:
        if out.exists():
            shutil.rmtree(out)
        print(f"== {name} -> {out}", flush=True)
        out.mkdir(parents=True)
        started.write_text(json.dumps({"args": arguments}, indent=1))  # what a run cut short may resume
        run(stage_args)
    done.write_text(json.dumps(stage_record(), indent=1))
    return out


def read_metrics(folder) -> list[dict]:
    path = Path(folder) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def eval_points(folder) -> list[dict]:
    """The held-out evaluations logged along a run (eval/* records), in step order:
    step, gold (mean gold reward), kl (sequence KL to the reference), win_rate, and
    rm_score when a reward model was scored too."""
    points = {}
    for row in read_metrics(folder):
        if "eval/gold_reward" in row:
            points[row["step"]] = {
                "step": row["step"], "gold": row["eval/gold_reward"], "kl": row["eval/kl"],
                "win_rate": row["eval/win_rate"], "length": row["eval/response_length"],
                **({"rm_score": row["eval/rm_score"]} if "eval/rm_score" in row else {}),
            }
    return [points[k] for k in sorted(points)]


def write_csv(path, rows: list[dict]) -> Path:
    """Rows of dicts as CSV, columns in order of first appearance."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {path}")
    return path


def pyplot():
    """matplotlib.pyplot, or None (with a note) when matplotlib is not installed: the
    CSVs are written either way."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no window
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed, so no plot: pip install matplotlib (the CSV has every point)")
        return None
    plt.rcParams.update({"figure.dpi": 100, "font.size": 9, "axes.grid": True, "grid.alpha": 0.3})
    return plt


def save_figure(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    import matplotlib.pyplot as plt

    plt.close(fig)  # written: its memory is freed
    print(f"wrote {path}")
    return path


def upper_frontier(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The Pareto frontier of (kl, reward) points: those no other point beats with at
    most the same KL, in increasing KL."""
    front, best = [], -math.inf
    for kl, reward in sorted(points):
        if reward > best:
            front.append((kl, reward))
            best = reward
    return front


def frontier_at(front: list[tuple[float, float]], kl: float) -> float:
    """The best reward the frontier reaches within `kl` (-inf below its first point)."""
    rewards = [r for k, r in front if k <= kl]
    return max(rewards) if rewards else -math.inf


# ---- Gao, Schulman & Hilton (2022), "Scaling Laws for Reward Model Overoptimization" ----

def bon_kl(n: int) -> float:
    """KL(best-of-n || base) = log n - (n - 1) / n nats (Stiennon et al. 2020, appendix G.3;
    Gao et al. 2022, eq. 1): exact for a continuous reward, an upper bound otherwise."""
    return math.log(n) - (n - 1) / n


def best_of_n(proxy, gold, n: int) -> tuple[float, float]:
    """Expected (proxy, gold) score of the sample that `proxy` ranks first among n drawn
    without replacement from one prompt's N samples, averaged over all C(N, n) draws.

    Sorted by proxy score, the i-th smallest sample (i = 1..N) is a draw's best exactly
    when the draw holds it and n - 1 of the i - 1 below it: probability
    C(i - 1, n - 1) / C(N, n). This is the unbiased estimator of Gao et al. (appendix I),
    with no resampling noise."""
    proxy, gold = np.asarray(proxy, dtype=float), np.asarray(gold, dtype=float)
    N = len(proxy)
    if not 1 <= n <= N:
        raise ValueError(f"best-of-{n} needs at least {n} samples, got {N}")
    order = np.argsort(proxy, kind="stable")
    weights = np.array([math.comb(i - 1, n - 1) for i in range(1, N + 1)], dtype=float) / math.comb(N, n)
    return float(weights @ proxy[order]), float(weights @ gold[order])


def fit_gao(d, reward, form: str) -> dict:
    """Least-squares fit of Gao et al.'s gold-reward curves to points (d, reward), where
    d = sqrt(KL) and reward is measured from the starting policy (0 at d = 0):

        best-of-n ("bon"): R(d) = d (a - b d)
        RL ("rl"):         R(d) = d (a - b log d)

    Both are linear in (a, b), so the fit is one linear least-squares solve. Returns a,
    b, r2 (the share of the rewards' variance the fit explains) and the fitted curve's
    peak (d_peak, R_peak) when b > 0."""
    d, reward = np.asarray(d, dtype=float), np.asarray(reward, dtype=float)
    keep = d > 0  # d = 0 lies on both curves by construction (and log 0 is undefined)
    d, reward = d[keep], reward[keep]
    if len(d) < 2:
        raise ValueError("fit_gao needs at least two points with d > 0")
    if form == "bon":
        features = np.stack([d, -d * d], 1)
    elif form == "rl":
        features = np.stack([d, -d * np.log(d)], 1)
    else:
        raise ValueError(f"form must be 'bon' or 'rl', not {form!r}")
    (a, b), *_ = np.linalg.lstsq(features, reward, rcond=None)
    residual = reward - features @ np.array([a, b])
    total = ((reward - reward.mean()) ** 2).sum()
    r2 = 1.0 - (residual ** 2).sum() / total if total > 0 else float("nan")
    result = {"a": float(a), "b": float(b), "r2": float(r2)}
    if b > 0:  # the curve rises, peaks and falls: where does the proxy stop helping?
        d_peak = a / (2 * b) if form == "bon" else math.exp(a / b - 1)
        result.update(d_peak=d_peak, r_peak=float(gao_curve(d_peak, a, b, form)))
    return result


def gao_curve(d, a: float, b: float, form: str):
    """R(d) of `fit_gao`'s forms (0 at d = 0)."""
    d = np.asarray(d, dtype=float)
    if form == "bon":
        return d * (a - b * d)
    safe = np.where(d > 0, d, 1.0)
    return np.where(d > 0, d * (a - b * np.log(safe)), 0.0)
