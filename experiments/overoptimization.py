"""Reward hacking: optimise a proxy reward model and watch the gold judge (Gao, Schulman
& Hilton 2022, "Scaling Laws for Reward Model Overoptimization", at laptop scale).

Proxy reward models are trained on small random subsets of the built-in task's
gold-labelled pairs (100, 250, 1,000 and 4,000 by default). Against each proxy:

- best-of-n: sample n = 1..256 responses per held-out prompt from the SFT policy and
  keep the one the proxy likes best; KL(best-of-n || SFT) = log n - (n - 1)/n;
- RL: PPO with a weak KL penalty, evaluated along the run on held-out prompts.

Both are plotted against d = sqrt(KL): the proxy's score keeps rising, the gold
judge's rises, flattens and (for a poor proxy) falls. Gao et al.'s forms

    R_bon(d) = d (a - b d),      R_rl(d) = d (a - b log d)

are fitted to the gold curves (gold reward minus the SFT policy's), and the fit
quality reported. The highest-scoring samples of the PPO run against the smallest
proxy show what the policy learned to exploit.

    python -m experiments.overoptimization      # about 14 minutes on 2 CPU cores

Writes out/experiments/overoptimization/{rl.csv, bon.csv, fits.csv, samples.md,
overoptimization.png}.
"""

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import train_ppo
import train_rm
from experiments.common import (ExperimentArgs, best_of_n, bon_kl, eval_points, fit_gao, gao_curve,
                                model_fingerprints, pyplot, run_stage, save_figure, write_csv)
from minalign import distributed, task
from minalign.checkpoint import load_model
from minalign.evaluate import held_out_prompts
from minalign.reward import score_rollouts
from minalign.cli import ArgumentError, check_args, run
from minalign.rollout import sample_batches
from minalign.tokenizer import get_tokenizer


@dataclass
class Args(ExperimentArgs):
    """Proxy reward models from few pairs; best-of-n and PPO against them, judged by the gold judge."""

    pair_counts: tuple[int, ...] = (100, 250, 1000, 4000)
    """Training pairs of each proxy reward model (a random subset of the task's pairs)."""
    rm_epochs: float = 4.0
    """Passes over each proxy's pairs ..."""
    rm_min_steps: int = 150
    """... but at least this many steps, so the smallest proxies are trained too."""
    ppo_updates: int = 100
    """PPO updates against each proxy."""
    ppo_kl_coef: float = 0.01
    """PPO's (weak) KL coefficient."""
    ppo_lr: float = 5e-5
    """PPO's learning rate."""
    ppo_eval_interval: int = 10
    """PPO updates between held-out evaluations."""
    bon_prompts: int = 64
    """Held-out prompts for best-of-n."""
    bon_max_n: int = 256
    """Samples per prompt for best-of-n; n runs over the powers of 2 up to it."""
    n_show: int = 3
    """Samples of the PPO policy trained against the smallest proxy to show."""

    def __post_init__(self):
        super().__post_init__()
        check_args(self, positive=("pair_counts", "rm_epochs", "ppo_updates", "ppo_eval_interval", "bon_prompts",
                                   "bon_max_n"), non_negative=("rm_min_steps", "ppo_kl_coef", "ppo_lr", "n_show"))
        for n in self.pair_counts:  # refused now, not after the smaller proxies are trained
            try:
                train_rm.Args(n_train_pairs=n, **self.pair_settings())
            except ArgumentError as error:
                raise ArgumentError(str(error).replace("--n-train-pairs", "--pair-counts")) from None


def proxy_epochs(args: Args, n_pairs: int) -> float:
    """--rm-epochs over n_pairs, or more if that gives fewer than --rm-min-steps steps."""
    steps_per_epoch = n_pairs // args.batch_size  # train_rm.py leaves the last partial batch out
    # + 0.5: train_rm.py's int(epochs * steps_per_epoch) is then rm_min_steps, never one short
    return max(args.rm_epochs, (args.rm_min_steps + 0.5) / steps_per_epoch)


def main(args: Args):
    t0 = time.time()
    root = Path(args.out_dir) / "overoptimization"
    print(f"overoptimization: proxies from {', '.join(map(str, args.pair_counts))} pairs; best-of-n up to "
          f"{args.bon_max_n} and {args.ppo_updates} PPO updates against each (about 14 minutes on 2 CPU cores "
          f"at the defaults) -> {root}")
    distributed.setup(args.device)  # a --device or MINALIGN_CPU_BLOCKS no run could use stops here, before any
    proxies = {}
    for n in args.pair_counts:
        stage = train_rm.Args(out_dir=str(root / f"rm-{n}"), n_train_pairs=n, epochs=proxy_epochs(args, n),
                              **args.pair_settings())
        proxies[n] = run_stage(f"proxy reward model, {n} pairs", train_rm.main, stage) / "ckpt.pt"
    bon_rows = best_of_n_curves(args, proxies, root)
    rl_rows = []
    for n in args.pair_counts:
        stage = train_ppo.Args(out_dir=str(root / f"ppo-{n}"), rm_dir=str(root / f"rm-{n}"), kl_coef=args.ppo_kl_coef,
                               lr=args.ppo_lr, updates=args.ppo_updates, eval_interval=args.ppo_eval_interval,
                               **args.ppo_settings())
        folder = run_stage(f"PPO against the {n}-pair proxy", train_ppo.main, stage)
        points = eval_points(folder)
        for p in points:
            rl_rows.append({"n_pairs": n, "step": p["step"], "kl": p["kl"], "d": math.sqrt(max(p["kl"], 0.0)),
                            "proxy": p["rm_score"], "gold": p["gold"],
                            "proxy_gain": p["rm_score"] - points[0]["rm_score"], "gold_gain": p["gold"] - points[0]["gold"]})
    write_csv(root / "rl.csv", rl_rows)
    write_csv(root / "bon.csv", bon_rows)
    fits = fit_all(args, bon_rows, rl_rows)
    write_csv(root / "fits.csv", fits)
    for f in fits:
        if f.get("d_peak", math.inf) <= f["d_max"]:
            peak = f"gold peaks at d {f['d_peak']:.2f} (KL {f['d_peak'] ** 2:.1f} nats)"
        else:
            peak = f"gold still rising at the largest d measured, {f['d_max']:.2f}"
        print(f"{f['method']:>4} {f['n_pairs']:>5} pairs: a {f['a']:+.3f} b {f['b']:+.3f} R^2 {f['r2']:.3f}; {peak}")
    show_samples(args, root)
    plot(args, bon_rows, rl_rows, fits, root / "overoptimization.png")
    print(f"overoptimization: done in {time.time() - t0:.0f}s")


@torch.no_grad()
def best_of_n_curves(args, proxies: dict, root: Path) -> list[dict]:
    """Sample bon_max_n SFT responses per held-out prompt, score them with every proxy
    and the gold judge (cached in bon_scores.json), then best-of-n for n = 1, 2, 4, ..."""
    cache = root / "bon_scores.json"
    settings = {"scored": "token ids as sampled",  # what the proxies scored: a cache that differs is made again
                "prompts": args.bon_prompts, "samples": args.bon_max_n, "max_new_tokens": args.max_new_tokens,
                "seed": args.seed, "proxies": {str(n): str(p) for n, p in proxies.items()},
                "models": model_fingerprints({"sft": Path(args.sft_dir) / "ckpt.pt",
                                              **{str(n): path for n, path in proxies.items()}})}
    cached = json.loads(cache.read_text()) if cache.exists() else None
    if cached is not None and cached["settings"] == settings:
        scores = cached
    else:
        device = distributed.setup(args.device).device
        tokenizer = get_tokenizer("builtin")
        policy, _ = load_model(Path(args.sft_dir) / "ckpt.pt", device)
        prompts = held_out_prompts(tokenizer, args.bon_prompts, args.seed)
        rollouts, texts = [], []  # one batch of bon_max_n responses per prompt
        for k, prompt in enumerate(prompts):
            [rollout] = sample_batches(policy, tokenizer, [prompt] * args.bon_max_n, args.max_new_tokens,
                                       batch_size=args.bon_max_n, seed=args.seed + k)
            rollouts.append(rollout)
            texts += [prompt + r for r in rollout.response_texts(tokenizer)]
            if (k + 1) % 8 == 0 or k + 1 == len(prompts):
                print(f"  best-of-n: sampled {k + 1}/{len(prompts)} prompts x {args.bon_max_n}", flush=True)
        scores = {"settings": settings, "gold": np.reshape(task.gold_reward(texts), (len(prompts), -1)).tolist()}
        for n, path in proxies.items():
            model, _ = load_model(path, device)
            scores[str(n)] = score_rollouts(model, rollouts).reshape(len(prompts), -1).tolist()
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(scores))
    rows = []
    sizes = [2 ** k for k in range(int(math.log2(args.bon_max_n)) + 1)]
    for n_pairs in proxies:
        proxy, gold = scores[str(n_pairs)], scores["gold"]
        base_proxy, base_gold = np.mean(proxy), np.mean(gold)  # n = 1: the SFT policy itself
        for n in sizes:
            picks = np.array([best_of_n(p, g, n) for p, g in zip(proxy, gold)])  # (prompts, 2)
            kl = bon_kl(n)
            rows.append({"n_pairs": n_pairs, "n": n, "kl": kl, "d": math.sqrt(kl), "proxy": picks[:, 0].mean(),
                         "gold": picks[:, 1].mean(), "proxy_gain": picks[:, 0].mean() - base_proxy,
                         "gold_gain": picks[:, 1].mean() - base_gold})
    return rows


def fit_all(args, bon_rows, rl_rows) -> list[dict]:
    """Gao et al.'s forms fitted to each gold curve."""
    fits = []
    for method, rows in (("bon", bon_rows), ("rl", rl_rows)):
        for n in args.pair_counts:
            mine = [r for r in rows if r["n_pairs"] == n]
            d, gain = [r["d"] for r in mine], [r["gold_gain"] for r in mine]
            if sum(x > 0 for x in d) >= 2:
                fits.append({"method": method, "n_pairs": n, **fit_gao(d, gain, method), "d_max": max(d)})
    return fits


def show_samples(args, root: Path):
    """The proxy's favourite samples from the final evaluation of the PPO run against
    the smallest proxy, with their proxy and gold scores."""
    n = min(args.pair_counts)
    result = json.loads((root / f"ppo-{n}" / "eval.json").read_text())
    best = sorted(result["samples"], key=lambda s: -s["rm_score"])[: args.n_show]
    lines = [f"PPO against the {n}-pair proxy, after {args.ppo_updates} updates (KL {result['kl']:.1f} nats): "
             f"mean proxy score {result['rm_score']:+.2f}, mean gold {result['gold_reward']:+.3f} "
             f"(SFT {result['ref_gold_reward']:+.3f}). The proxy's favourite samples:", ""]
    for s in best:
        lines.append(f"- proxy {s['rm_score']:+.2f}, gold {s['gold']:+.2f}: \"{s['prompt']}{s['response']}\"")
    text = "\n".join(lines)
    print(text)
    (root / "samples.md").write_text(text + "\n")


def plot(args, bon_rows, rl_rows, fits, path):
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(2, 2, figsize=(9, 6), sharex="col")
    palette = ["tab:red", "tab:orange", "tab:green", "tab:blue", "tab:purple", "tab:brown", "tab:pink", "tab:gray"]
    colors = {n: palette[i % len(palette)] for i, n in enumerate(args.pair_counts)}
    for col, (method, rows, title) in enumerate((("bon", bon_rows, "best-of-n (n = 1..%d)" % args.bon_max_n),
                                                   ("rl", rl_rows, "PPO, kl_coef %g" % args.ppo_kl_coef))):
        for n in args.pair_counts:
            mine = [r for r in rows if r["n_pairs"] == n]  # in order of n, or of PPO updates
            d = [r["d"] for r in mine]
            axes[0, col].plot(d, [r["proxy_gain"] for r in mine], "o-", ms=3, lw=1, color=colors[n], label=f"{n} pairs")
            axes[1, col].plot(d, [r["gold_gain"] for r in mine], "o", ms=3, color=colors[n], label=f"{n} pairs")
            fit = next((f for f in fits if f["method"] == method and f["n_pairs"] == n), None)
            if fit is not None:
                grid = np.linspace(0, max(d), 100)
                axes[1, col].plot(grid, gao_curve(grid, fit["a"], fit["b"], method), "--", color=colors[n],
                                  label=f"fit, R^2 {fit['r2']:.2f}")
        axes[0, col].set_title(title)
        axes[0, col].set_ylabel("proxy score gain (SFT std devs)")
        axes[1, col].set_ylabel("gold score gain (VADER)")
        axes[1, col].set_xlabel("d = sqrt(KL to SFT), sqrt(nats)")
        axes[1, col].axhline(0, color="gray", linewidth=0.8)
        axes[0, col].legend(fontsize=7)
        axes[1, col].legend(fontsize=7, ncol=2)
    fig.suptitle("Optimising a proxy reward model: its score, and the gold judge's")
    save_figure(fig, path)


if __name__ == "__main__":
    run(main, Args)
