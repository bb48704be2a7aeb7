"""The reward/KL frontier of DPO and PPO on the built-in task (the DPO paper's IMDb
figure, Rafailov et al. 2023, fig. 2 left, at laptop scale).

Both methods start from the same SFT policy and learn from the same gold-labelled
preference pairs (PPO through a reward model trained on them). DPO runs once per
beta, PPO once per KL coefficient; every run is evaluated on the same held-out
prompts before training and at intervals along it, each evaluation giving one point:
mean gold reward against the sequence-level KL(pi || pi_ref) of the policy's own
samples. A method's frontier is the best gold reward it reaches at each KL budget.

    python -m experiments.frontier          # about 16 minutes on 2 CPU cores

Writes out/experiments/frontier/{frontier.csv, frontier.png, summary.txt}.
"""

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import train_dpo
import train_ppo
import train_rm
from experiments.common import (ExperimentArgs, eval_points, frontier_at, pyplot, run_stage, save_figure,
                                upper_frontier, write_csv)
from minalign import distributed
from minalign.cli import check_args, run


@dataclass
class Args(ExperimentArgs):
    """DPO's and PPO's gold reward against KL to the reference, on the built-in task."""

    dpo_betas: tuple[float, ...] = (0.05, 0.1, 0.5, 1.0, 5.0)
    """DPO's beta, one run each."""
    dpo_epochs: float = 3.0
    """Passes over the pairs per DPO run (with 1, DPO's frontier trails PPO's: see the README)."""
    dpo_eval_interval: int = 42
    """DPO steps between evaluations."""
    ppo_kl_coefs: tuple[float, ...] = (0.2, 0.1, 0.05, 0.02)
    """PPO's KL coefficient beta (fixed), one run each."""
    ppo_updates: int = 80
    """PPO updates per run."""
    ppo_eval_interval: int = 10
    """PPO updates between evaluations."""
    rm_dir: str = "out/rm"
    """PPO's reward model (trained there on the same pairs if absent; an existing one is used as it is)."""

    def __post_init__(self):
        super().__post_init__()
        check_args(self, positive=("dpo_betas", "dpo_epochs", "dpo_eval_interval", "ppo_updates", "ppo_eval_interval"),
                   non_negative=("ppo_kl_coefs",))


def main(args: Args):
    t0 = time.time()
    root = Path(args.out_dir) / "frontier"
    n_runs = len(args.dpo_betas) + len(args.ppo_kl_coefs)
    print(f"frontier: {len(args.dpo_betas)} DPO and {len(args.ppo_kl_coefs)} PPO runs "
          f"(about 16 minutes on 2 CPU cores at the defaults) -> {root}")
    rm_path = train_rm.ensure(args.rm_dir, distributed.setup(args.device), **args.pair_settings())
    print(f"PPO's reward model: {rm_path}")
    rows, done = [], 0
    for beta in args.dpo_betas:
        stage = train_dpo.Args(out_dir=str(root / f"dpo-beta{beta:g}"), beta=beta, epochs=args.dpo_epochs,
                               eval_interval=args.dpo_eval_interval, eval_max_new_tokens=args.max_new_tokens,
                               **args.pair_settings())
        folder = run_stage(f"DPO beta {beta:g}", train_dpo.main, stage)
        rows += [{"method": "DPO", "beta": beta, **p} for p in eval_points(folder)]
        done += 1
        print(f"-- {done}/{n_runs} runs done, {time.time() - t0:.0f}s", flush=True)
    for coef in args.ppo_kl_coefs:
        stage = train_ppo.Args(out_dir=str(root / f"ppo-kl{coef:g}"), rm_dir=args.rm_dir, kl_coef=coef,
                               updates=args.ppo_updates, eval_interval=args.ppo_eval_interval, **args.ppo_settings())
        folder = run_stage(f"PPO kl_coef {coef:g}", train_ppo.main, stage)
        rows += [{"method": "PPO", "beta": coef, **p} for p in eval_points(folder)]
        done += 1
        print(f"-- {done}/{n_runs} runs done, {time.time() - t0:.0f}s", flush=True)
    write_csv(root / "frontier.csv", rows)
    summary = compare(rows)
    print(summary)
    (root / "summary.txt").write_text(summary + "\n")
    plot(rows, root / "frontier.png")
    print(f"frontier: done in {time.time() - t0:.0f}s")


def fronts(rows) -> dict[str, list[tuple[float, float]]]:
    return {m: upper_frontier([(r["kl"], r["gold"]) for r in rows if r["method"] == m]) for m in ("DPO", "PPO")}


def compare(rows, n_grid: int = 20) -> str:
    """Which frontier is higher, on a grid of KL budgets both methods reach."""
    front = fronts(rows)
    lo = max(front["DPO"][0][0], front["PPO"][0][0])
    hi = min(max(k for k, _ in front["DPO"]), max(k for k, _ in front["PPO"]))
    grid = np.linspace(lo, hi, n_grid) if hi > lo else np.array([lo])
    gaps = [frontier_at(front["DPO"], k) - frontier_at(front["PPO"], k) for k in grid]
    dpo_ahead = sum(g > 0 for g in gaps)
    lines = [f"KL budgets from {lo:.2f} to {hi:.2f} nats ({len(grid)} of them): DPO's frontier is higher at "
             f"{dpo_ahead}, PPO's at {sum(g < 0 for g in gaps)}; mean gap (DPO - PPO) {np.mean(gaps):+.3f} gold"]
    for method, points in front.items():
        kl, gold = points[-1]
        lines.append(f"{method}: best gold reward {gold:.3f} (at KL {kl:.2f})")
    return "\n".join(lines)


def plot(rows, path):
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    colors = {"DPO": "tab:blue", "PPO": "tab:orange"}
    for method, front in fronts(rows).items():
        points = [r for r in rows if r["method"] == method]
        settings = sorted({r["beta"] for r in points})
        markers = "osD^vP*X"
        for k, setting in enumerate(settings):
            mine = [r for r in points if r["beta"] == setting]
            ax.scatter([r["kl"] for r in mine], [r["gold"] for r in mine], s=18, alpha=0.55,
                       color=colors[method], marker=markers[k % len(markers)],
                       label=f"{method} {'beta' if method == 'DPO' else 'kl_coef'}={setting:g}")
        kl, gold = zip(*front)
        ax.step(kl, gold, where="post", color=colors[method], linewidth=2)
    ax.set_xlabel("KL(pi || pi_ref), nats per sequence")
    ax.set_ylabel("mean gold reward (VADER), held-out prompts")
    ax.set_title("Reward/KL frontier on the built-in task: DPO vs PPO")
    ax.legend(fontsize=7, ncol=2, loc="lower right")
    save_figure(fig, path)


if __name__ == "__main__":
    run(main, Args)
