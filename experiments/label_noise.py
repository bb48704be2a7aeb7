"""Garbage preferences in, misaligned model out: flip a share of the built-in task's
preference labels and follow the damage through every method.

For each share of flipped training labels (0, 10, 25 and 40% by default; the held-out
pairs stay clean) this trains a reward model, DPO, and PPO against that reward model,
all from the same SFT policy, and measures:

- the reward model's accuracy on clean held-out pairs (and its correlation with gold);
- DPO's and PPO's gold reward, win rate against SFT and KL on held-out prompts.

The methods are only machinery that consumes the preferences: the worse the labels,
the worse every one of them ends, and at 50% there is nothing left to learn.

    python -m experiments.label_noise       # about 13 minutes on 2 CPU cores

Writes out/experiments/label_noise/{label_noise.csv, label_noise.png}.
"""

import json
import time
from dataclasses import dataclass
from pathlib import Path

import train_dpo
import train_ppo
import train_rm
from experiments.common import ExperimentArgs, pyplot, run_stage, save_figure, write_csv
from minalign import distributed
from minalign.cli import check_args, run


@dataclass
class Args(ExperimentArgs):
    """Reward model, DPO and PPO trained on preference labels of which a share is flipped."""

    flips: tuple[float, ...] = (0.0, 0.1, 0.25, 0.4)
    """Shares of the training pairs given the wrong label."""
    dpo_beta: float = 0.1
    """DPO's beta."""
    ppo_updates: int = 60
    """PPO updates per run."""
    ppo_kl_coef: float = 0.05
    """PPO's KL coefficient."""

    def __post_init__(self):
        super().__post_init__()
        check_args(self, positive=("dpo_beta", "ppo_updates"), non_negative=("ppo_kl_coef",), fractions=("flips",))


def main(args: Args):
    t0 = time.time()
    root = Path(args.out_dir) / "label_noise"
    print(f"label noise: reward model, DPO and PPO at {len(args.flips)} shares of flipped labels "
          f"(about 13 minutes on 2 CPU cores at the defaults) -> {root}")
    distributed.setup(args.device)  # a --device or MINALIGN_CPU_BLOCKS no run could use stops here, before any
    rows = []
    for k, flip in enumerate(args.flips):
        name = f"flip{flip:g}"
        rm = run_stage(f"reward model, {flip:.0%} flipped", train_rm.main,
                       train_rm.Args(out_dir=str(root / f"rm-{name}"), label_flip=flip, **args.pair_settings()))
        dpo = run_stage(f"DPO, {flip:.0%} flipped", train_dpo.main,
                        train_dpo.Args(out_dir=str(root / f"dpo-{name}"), label_flip=flip, beta=args.dpo_beta,
                                       eval_max_new_tokens=args.max_new_tokens, **args.pair_settings()))
        ppo = run_stage(f"PPO, {flip:.0%} flipped", train_ppo.main,
                        train_ppo.Args(out_dir=str(root / f"ppo-{name}"), rm_dir=str(rm), kl_coef=args.ppo_kl_coef,
                                       updates=args.ppo_updates, **args.ppo_settings()))
        rm_results = json.loads((rm / "eval.json").read_text())
        rm_accuracy = rm_results.get("accuracy", rm_results.get("test_accuracy"))  # the older name, in older runs
        dpo_eval = json.loads((dpo / "eval.json").read_text())
        ppo_eval = json.loads((ppo / "eval.json").read_text())
        rows.append({
            "flip": flip, "rm_accuracy": rm_accuracy, "rm_gold_correlation": rm_results["gold_correlation"],
            "dpo_gold": dpo_eval["gold_reward"], "dpo_win_rate": dpo_eval["win_rate"], "dpo_kl": dpo_eval["kl"],
            "dpo_pair_accuracy": dpo_eval["rewards/accuracies"],
            "ppo_gold": ppo_eval["gold_reward"], "ppo_win_rate": ppo_eval["win_rate"], "ppo_kl": ppo_eval["kl"],
            "sft_gold": dpo_eval["ref_gold_reward"],
        })
        print(f"-- {k + 1}/{len(args.flips)} noise levels done, {time.time() - t0:.0f}s: {rows[-1]}", flush=True)
    write_csv(root / "label_noise.csv", rows)
    print(f"{'flipped':>8}{'RM acc':>8}{'DPO win':>9}{'PPO win':>9}{'DPO gold':>10}{'PPO gold':>10}")
    for r in rows:
        print(f"{r['flip']:>8.0%}{r['rm_accuracy']:>8.3f}{r['dpo_win_rate']:>9.3f}{r['ppo_win_rate']:>9.3f}"
              f"{r['dpo_gold']:>10.3f}{r['ppo_gold']:>10.3f}")
    plot(rows, root / "label_noise.png")
    print(f"label noise: done in {time.time() - t0:.0f}s")


def plot(rows, path):
    plt = pyplot()
    if plt is None:
        return
    flips = [100 * r["flip"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    left.plot(flips, [r["rm_accuracy"] for r in rows], "o-", label="reward model: accuracy on clean pairs")
    left.plot(flips, [r["dpo_pair_accuracy"] for r in rows], "s-", label="DPO: implicit reward accuracy")
    left.plot(flips, [r["dpo_win_rate"] for r in rows], "^-", label="DPO: gold win rate vs SFT")
    left.plot(flips, [r["ppo_win_rate"] for r in rows], "v-", label="PPO: gold win rate vs SFT")
    left.axhline(0.5, color="gray", linewidth=0.8)
    left.set_ylabel("accuracy / win rate")
    left.set_title("Held-out accuracy and win rate")
    right.plot(flips, [r["dpo_gold"] for r in rows], "^-", color="tab:green", label="DPO")
    right.plot(flips, [r["ppo_gold"] for r in rows], "v-", color="tab:red", label="PPO")
    right.axhline(rows[0]["sft_gold"], color="gray", linewidth=0.8, linestyle="--", label="SFT")
    right.set_ylabel("mean gold reward (VADER)")
    right.set_title("Gold reward on held-out prompts")
    for ax in (left, right):
        ax.set_xlabel("training labels flipped (%)")
        ax.legend(fontsize=7)
    fig.suptitle("Garbage preferences in, misaligned model out")
    save_figure(fig, path)


if __name__ == "__main__":
    run(main, Args)
