"""Reward modelling: learn a scalar score from preference pairs (RLHF's second stage, after SFT).

With no arguments it works on the built-in task end to end: it trains the SFT policy
if out/sft holds none, samples and judges preference pairs if out/pairs holds none,
then trains the reward model (a copy of the SFT trunk plus a scalar head) with the
Bradley-Terry loss, normalises its scores, and reports held-out accuracy and the
correlation of its scores with the gold judge.

    python train_rm.py
    python train_rm.py --label-temperature 0.2     # noisy, annotator-like labels
    python train_rm.py --data ../shared/data/hh-rlhf/harmless-base-test.jsonl.gz --tokenizer gpt2
    python train_rm.py --resume                       # continue a run that was cut short

The algorithm, in `train`:
  1. the reward model is a copy of the SFT policy whose last hidden states feed a
     scalar head instead of the vocabulary's logits (`RewardModel` in minalign/reward.py);
  2. each step it scores a batch's chosen and rejected texts, read at each one's last
     real token (`pair_scores`);
  3. the Bradley-Terry loss, -log sigmoid(r_chosen - r_rejected) (`bradley_terry_loss`);
  4. after training, its scores are shifted and scaled to mean 0 and standard deviation
     1 over the training pairs' responses, the units PPO reads (`normalise`).
"""

import json
import time
from dataclasses import asdict, dataclass
from typing import ClassVar
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import train_sft
from minalign import data, distributed, task
from minalign.checkpoint import (check_distinct, check_out_dir, check_stage, check_weights_finite, file_fingerprint,
                                 finished, load_checkpoint, load_model, rng_state, save_checkpoint, set_rng_state,
                                 weights_fingerprint)
from minalign.cli import ArgumentError, check_args, check_divisible, check_finite, flag, refuse_given, run
from minalign.evaluate import eval_metrics, write_eval
from minalign.logger import MetricsLogger, Progress, counted
from minalign.optim import cosine_lr, make_optimizer, set_lr
from minalign.pairs import (PairArgs, check_same_pairs, check_stop_at, continue_pair_run, pair_batches,
                            pairs_fingerprint, tokenize_splits)
from minalign.preferences import bayes_optimal_accuracy, builtin_pairs, select_pairs, write_jsonl
from minalign.reward import (RewardModel, accuracy_and_margin, bradley_terry_loss, pair_scores, score_pairs,
                             score_rollouts)
from minalign.resume import note_saved, save_due, start_or_resume, stopped_early
from minalign.rollout import sample_batches
from minalign.tokenizer import data_note, get_tokenizer


@dataclass
class Args(PairArgs):
    """Train a reward model on preference pairs (the built-in task by default)."""

    stage: ClassVar[str] = "rm"
    builtin_only: ClassVar[tuple[str, ...]] = (*PairArgs.builtin_only, "margin")

    epochs: float = 4.0
    """Passes over the training pairs."""
    lr: float = 5e-4
    """Peak learning rate."""
    weight_decay: float = 0.1
    """AdamW weight decay on matrices."""
    margin: float = 0.0
    """Built-in task, ranked labels: demand a score gap of margin * (gold gap) (Llama 2's margin loss);
    0 is plain Bradley-Terry."""
    center_coef: float = 0.0
    """Weight of the reward-centring term coef * (r_c + r_r)^2 (Eisenstein et al. 2023)."""
    resume: bool = False
    """Continue the run in out_dir from its last checkpoint: model, optimizer, step and RNG
    state. A flag left out takes the run's value; one given another value is refused,
    except --stop-at, --out-dir, --device, --data, --sft-dir and --pairs-dir (where the
    run's pairs and SFT policy are now: they must be the same), --save-interval and
    --log-interval."""

    def __post_init__(self):
        super().__post_init__()
        check_args(self, positive=("epochs",), non_negative=("lr", "weight_decay", "margin", "center_coef"))
        if self.margin and (self.label_temperature is not None or self.label_flip):
            # the gold gap of a pair labelled against the judge is negative: the margin would mark it
            raise ArgumentError(f"--margin {self.margin:g}: with noisy labels (--label-temperature, --label-flip) "
                                f"the gold-score gap would tell the model which labels are wrong")


def normalise(model, tokenizer, train_pairs, device) -> None:
    """Shift and scale the model's scores to mean 0 and standard deviation 1 over (up to
    2,000 of) the training pairs' responses: the units the checkpoint, and so PPO, reads
    its scores in (Ziegler et al. 2019)."""
    # On the built-in task the pairs' responses are the SFT policy's samples, which PPO
    # starts from; on real data, the human-written responses.
    chosen, rejected = score_pairs(model, train_pairs[:2000], tokenizer.pad_id, device)
    print(f"normalising the scores over {2 * len(chosen):,} responses of the training pairs", flush=True)
    model.fit_normalisation(torch.cat([chosen, rejected]))


def held_out_accuracy(args, model, tokenizer, test_pairs, test_raw, device) -> dict:
    """Held-out accuracy (against the best possible, for noisy labels) and margin."""
    results = {}
    results["accuracy"], results["margin"] = accuracy_and_margin(model, test_pairs, tokenizer.pad_id, device)
    if args.data is None and args.label_temperature is not None:
        results["bayes_optimal_accuracy"] = bayes_optimal_accuracy(test_raw)
        results["accuracy_vs_bayes"] = results["accuracy"] / results["bayes_optimal_accuracy"]
    return results


def gold_correlation(args, model, tokenizer, device) -> float:
    """Built-in task: the correlation of the reward model's scores with the gold judge's
    over fresh SFT samples on held-out prompts."""
    policy, _ = load_model(Path(args.sft_folder()) / "ckpt.pt", device)
    prompts = task.prompts("test", tokenizer, n=500, seed=args.seed + 7)
    print(f"agreement with the gold judge on {len(prompts)} fresh SFT samples", flush=True)
    rollouts = sample_batches(policy, tokenizer, prompts, args.max_length - task.MAX_PROMPT_TOKENS,
                              seed=args.seed + 7)
    responses = [text for rollout in rollouts for text in rollout.response_texts(tokenizer)]
    gold = torch.tensor(task.gold_reward([p + r for p, r in zip(prompts, responses)]))
    return torch.corrcoef(torch.stack([score_rollouts(model, rollouts), gold]))[0, 1].item()


def save_reward_model(args, model, tokenizer, step: int, **entries) -> None:
    """The reward model to out_dir/ckpt.pt (atomically), with `entries`: the trained one's
    `results`, or along the run the `resume` state that --resume continues from."""
    save_checkpoint(Path(args.out_dir) / "ckpt.pt", {
        "kind": "reward", "stage": "rm", "model": model.state_dict(), "model_config": asdict(model.config),
        "args": asdict(args), "step": step, "tokenizer": tokenizer.name, **entries})
    note_saved(args.out_dir, step, resumable="resume" in entries)


def train(args: Args, dist: distributed.DistInfo) -> str:
    """Train (or with --resume, go on training); returns the checkpoint's path."""
    ckpt = None
    if args.resume:
        args, ckpt = continue_pair_run(args)
    torch.manual_seed(args.seed)
    policy, tokenizer, train_raw, test_raw = prepare_pairs(args, dist)
    if ckpt is not None:
        check_same_pairs(ckpt, args, train_raw, test_raw)
    started_from = {"sft": weights_fingerprint(policy), "pairs": pairs_fingerprint(train_raw, test_raw)}
    train_pairs, test_pairs = tokenize_splits(args, tokenizer, train_raw, test_raw, dist.is_main)
    # gold-score gaps of the pairs kept, for the optional margin (built-in task only)
    kept = [train_raw[chosen.source] for chosen, _ in train_pairs]  # tokenize_pairs may skip some
    gold_gap = torch.tensor([p.get("chosen_gold", 0.0) - p.get("rejected_gold", 0.0) for p in kept])

    model = RewardModel.from_policy(policy, args.seed).to(dist.device)  # however the SFT policy came to be
    del policy
    optimizer = make_optimizer(model, args.lr, args.weight_decay, device=dist.device)
    train_model = DDP(model) if dist.enabled else model
    batches, total_steps = pair_batches(args, dist, len(train_pairs), "reward model")
    # after every check, so that a run refused leaves the earlier one in out_dir as it was
    first, seconds_before = start_or_resume(ckpt, args.out_dir, dist, model, optimizer, total_steps)
    if ckpt is not None:
        rng = ckpt["resume"]["rng"]  # each process's (dropout's, if the SFT policy has any)
        set_rng_state(rng[min(dist.rank, len(rng) - 1)])  # (in as many processes, bit for bit)
    logger = MetricsLogger(args.out_dir, enabled=dist.is_main, resume_step=first - 1 if ckpt is not None else None)
    progress = Progress(total_steps, enabled=dist.is_main, start_step=first - 1)
    last = args.stop_at or total_steps

    t0 = time.time()
    for step in range(first, last + 1):
        lr = cosine_lr(step - 1, args.lr, total_steps, args.warmup_steps)
        set_lr(optimizer, lr)
        idx = batches.indices(step - 1)
        batch = data.collate_pairs([train_pairs[i] for i in idx], tokenizer.pad_id, dist.device)
        chosen, rejected = pair_scores(train_model, batch)  # (B,) each
        margin = args.margin * gold_gap[idx].to(dist.device) if args.margin else None  # (B,)
        loss = bradley_terry_loss(chosen, rejected, margin, args.center_coef).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip or float("inf"))
        optimizer.step()
        if step % args.log_interval == 0 or step == last:
            scores = torch.cat([chosen, rejected]).detach()
            metrics = {"loss": loss.item(), "accuracy": (chosen > rejected).float().mean().item(),
                       "margin": (chosen - rejected).mean().item(), "mean_reward": scores.mean().item(),
                       "min_reward": scores.min().item(), "max_reward": scores.max().item(),
                       "grad_norm": grad_norm.item(), "lr": lr}
            metrics = distributed.reduce_metrics(metrics, dist, lowest=["min_reward"], highest=["max_reward"])
            logger.log(step, **metrics)
            check_finite(step, loss=metrics["loss"])
            progress.print(step, **{k: round(v, 4) for k, v in metrics.items() if k not in ("lr", "grad_norm")})
        if save_due(step, last, args.save_interval):
            check_weights_finite(step, model)
            rng = distributed.gather_objects(rng_state(), dist)  # each process's: their batches differ
            if dist.is_main:
                save_reward_model(args, model, tokenizer, step, resume={
                    "optimizer": optimizer.state_dict(), "rng": rng, "started_from": started_from,
                    "sft_folder": args.sft_folder(), "n_pairs": len(train_pairs),
                    "train_seconds": seconds_before + time.time() - t0})

    train_seconds = seconds_before + time.time() - t0
    check_weights_finite(last, model)
    if dist.is_main and not stopped_early("train_rm.py", args.out_dir, last, total_steps):
        # the last step's checkpoint holds everything: --resume finishes an evaluation cut short
        normalise(model, tokenizer, train_pairs, dist.device)
        results = held_out_accuracy(args, model, tokenizer, test_pairs, test_raw, dist.device)  # in those units
        if args.data is None:  # does the reward model agree with the gold judge?
            results["gold_correlation"] = gold_correlation(args, model, tokenizer, dist.device)
        for k, v in results.items():
            print(f"eval/{k}: {v:.4f}")
        results["train_seconds"] = train_seconds
        eval_path = write_eval(args.out_dir, results)  # before the final checkpoint, which ends the run
        save_reward_model(args, model, tokenizer, total_steps, results=results)
        logger.log(total_steps, **eval_metrics(results))  # after it: logged once
        print(f"saved {args.out_dir}/ckpt.pt; wrote {eval_path}")
    distributed.barrier(dist)  # the other ranks wait for the checkpoint
    return str(Path(args.out_dir) / "ckpt.pt")


def ensure(out_dir: str, dist: distributed.DistInfo, **overrides) -> str:
    """The reward-model checkpoint in out_dir: reused when complete, resumed when a run was
    cut short, trained (Args defaults plus `overrides`) when absent."""
    check_out_dir(out_dir, "--rm-dir", stage="rm", read_finished=True)
    path = Path(out_dir) / "ckpt.pt"
    if path.exists():
        ckpt = load_checkpoint(path)
        if finished(ckpt):
            return str(path)
        if dist.is_main:
            print(f"== reward model: resuming the run cut short in {out_dir}")
        mine = {k: overrides[k] for k in ("sft_dir", "device") if k in overrides}  # the caller's SFT policy: checked
        try:
            return train(Args(**{**ckpt["args"], **mine, "out_dir": out_dir, "resume": True, "stop_at": None}), dist)
        except ArgumentError as error:  # about the reward model's run, not the caller's flags
            raise ArgumentError(f"--rm-dir {out_dir} holds a reward model cut short, which this run would finish "
                                f"first: {error}") from None
    if dist.is_main:
        print(f"== reward model: none in {out_dir}; training one")
    try:
        return train(Args(out_dir=out_dir, **overrides), dist)
    except ArgumentError as error:  # the flags it names are train_rm.py's, not the caller's
        settings = "".join(f" {flag(k)} {v}" for k, v in overrides.items() if v is not None and k != "device")
        raise ArgumentError(f"no reward model in {out_dir}, and training one with train_rm.py's defaults failed: "
                            f"{error}; train one with `python train_rm.py --out-dir {out_dir}{settings}` and the "
                            f"flags that fit") from None


# ------------------------------------------------------------------------------------
# Where the preference pairs come from, and the SFT policy that starts from them (the
# reward model's trunk here, DPO's policy and reference in train_dpo.py)


def prepare_pairs(args: PairArgs, dist):
    """SFT policy, tokenizer and (train, test) preference pairs, creating what is missing,
    once the flags and folders are checked (out_dir is made). Shared by train_rm.py and
    train_dpo.py."""
    if args.data is None:
        refuse_given(args, ("test_fraction",), "applies to --data; the built-in task has its own test prompts")
    else:
        refuse_given(args, args.builtin_only, "for the built-in task only, not with --data")
    check_divisible(args, ("batch_size",), dist.world_size)
    sft_dir = args.sft_folder()
    check_out_dir(args.out_dir, stage=args.stage)
    check_distinct(out_dir=args.out_dir, sft_dir=sft_dir)
    check_out_dir(sft_dir, "--sft-dir", stage="sft", read_finished=True)  # both may be written below
    tokenizer = get_tokenizer(args.tokenizer)
    if args.data is None:
        policy, train_pairs, test_pairs = builtin_task_pairs(args, dist, tokenizer, sft_dir)
    else:
        policy, train_pairs, test_pairs = data_file_pairs(args, dist, tokenizer, sft_dir)
    return policy, tokenizer, train_pairs, test_pairs


def builtin_task_pairs(args: PairArgs, dist, tokenizer, sft_dir: str):
    """Built-in task: the SFT policy (trained if missing) and the pairs it samples, judged by
    the gold judge (cached in --pairs-dir), optionally subsampled or with flipped labels."""
    labels = "ranked" if args.label_temperature is None else f"bt-t{args.label_temperature:g}"
    if not (Path(args.pairs_dir) / labels / "meta.json").exists():  # cached pairs: only read
        check_out_dir(args.pairs_dir, "--pairs-dir")
    if not (Path(sft_dir) / "ckpt.pt").exists() and args.max_length > train_sft.Args().block_size:
        raise ArgumentError(f"--max-length {args.max_length} exceeds the block size {train_sft.Args().block_size} "
                            f"of the SFT policy that would be trained in {sft_dir}")
    sft_path = train_sft.ensure(sft_dir, dist, tokenizer=args.tokenizer, device=args.device)
    policy, _ = load_model(sft_path, dist.device, tokenizer, args.max_length)
    train_pairs, test_pairs = builtin_pairs(
        Path(args.pairs_dir) / labels, policy, tokenizer, args.n_train_prompts, args.n_test_prompts,
        args.label_temperature, args.max_length - task.MAX_PROMPT_TOKENS, args.seed, dist.is_main,
        lambda: distributed.barrier(dist))
    if args.n_train_pairs is not None or args.label_flip:
        if args.n_train_pairs is not None and not 0 < args.n_train_pairs <= len(train_pairs):
            raise ArgumentError(f"--n-train-pairs {args.n_train_pairs}: {len(train_pairs):,} training pairs exist; "
                                f"raise --n-train-prompts for more")
        train_pairs, flipped = select_pairs(train_pairs, args.n_train_pairs, args.label_flip, args.seed)
        if dist.is_main:
            print(f"training on {len(train_pairs):,} pairs, {flipped:,} of them with the wrong label")
    return policy, train_pairs, test_pairs


def data_file_pairs(args: PairArgs, dist, tokenizer, sft_dir: str):
    """--data: the file's pairs split by --seed and --test-fraction, and an SFT policy for
    them: the one --sft-dir names, or one trained on the chosen responses of the training
    pairs."""
    pairs, stats = data.load_pairs(args.data)
    train_pairs, test_pairs = data.held_out_split(pairs, args.test_fraction, args.seed)
    if args.batch_size > len(train_pairs):  # now, not after the SFT policy is trained on them
        raise ArgumentError(f"--batch-size {args.batch_size}: {args.data} leaves only "
                            f"{counted(len(train_pairs), 'training pair')} ({len(test_pairs):,} held out by "
                            f"--test-fraction {args.test_fraction})")
    check_stop_at(args, len(train_pairs), at_most=True)  # fewer if some are the same once tokenized
    if dist.is_main:
        print(f"data: {args.data}: {len(train_pairs):,} train / {len(test_pairs):,} test pairs; {stats}")
        for note in (data_note(args), data.repeated_prompt_note(stats)):
            if note:
                print(note)
    source = {"data": str(Path(args.data).resolve()), "sha256": file_fingerprint(args.data), "seed": args.seed,
              "test_fraction": args.test_fraction}  # which pairs the SFT data comes from
    source_file = Path(sft_dir) / "source.json"
    if (Path(sft_dir) / "ckpt.pt").exists():
        made_from = data.read_record(source_file) if source_file.exists() else None
        if made_from is None or made_from.get("sha256") != source["sha256"]:
            if args.sft_dir is not None:  # the user's own SFT policy, taken as it is
                return own_sft_policy(args, sft_dir, dist, tokenizer), train_pairs, test_pairs
            what = ("not made from these pairs" if made_from is None
                    else f"made from the chosen responses of other pairs ({made_from.get('data')})")
            raise ArgumentError(f"{sft_dir} holds an SFT policy {what}: pass --sft-dir {sft_dir} to start from it "
                                f"as it is, or another --sft-dir (and --out-dir)")
        check_same_split(sft_dir, made_from, source)
    policy = sft_on_chosen(args, dist, tokenizer, sft_dir, train_pairs, source)
    return policy, train_pairs, test_pairs


def check_same_split(sft_dir: str, made_from: dict, source: dict) -> None:
    """An SFT policy made from this file must have seen only this run's training pairs: the
    same file (wherever it is now), seed and test fraction, so no held-out pair is in its data."""
    split = ("sha256", "seed", "test_fraction")
    if any(made_from.get(k) != source[k] for k in split):
        why = ", ".join(f"{k} {made_from.get(k)} there, {source[k]} here" for k in split
                        if made_from.get(k) != source[k])
        raise ArgumentError(f"--sft-dir {sft_dir} holds an SFT policy trained on the chosen responses of "
                            f"another split of these pairs ({why}), some of them held out here: pass another "
                            f"--sft-dir (and --out-dir)")


def sft_on_chosen(args: PairArgs, dist, tokenizer, sft_dir: str, train_pairs: list, source: dict):
    """The SFT policy trained on the chosen responses of the training pairs (with fixed
    settings; see --sft-dir's help), or the one already in sft_dir, resumed if unfinished."""
    sft_file = Path(sft_dir) / "sft_data.jsonl"
    if dist.is_main and not (Path(sft_dir) / "ckpt.pt").exists():
        rows = [{"prompt": p["prompt"], "completion": p["chosen"]} for p in train_pairs if p["chosen"].strip()]
        print(f"SFT data: the {len(rows):,} non-empty chosen responses of the training pairs "
              f"({counted(len(train_pairs) - len(rows), 'empty one')} left out) -> {sft_file}")
        write_jsonl(sft_file, rows)
        (Path(sft_dir) / "source.json").write_text(json.dumps(source, indent=1))
    distributed.barrier(dist)
    try:
        sft_path = train_sft.ensure(sft_dir, dist, data=str(sft_file), tokenizer=args.tokenizer,
                                    block_size=args.max_length, batch_size=16, max_steps=300, eval_interval=100,
                                    device=args.device)
    except ArgumentError as error:  # its settings are this function's, not the user's flags
        raise ArgumentError(f"SFT on the chosen responses of the {len(train_pairs):,} training pairs "
                            f"({sft_file}): {error}") from None
    policy, _ = load_model(sft_path, dist.device, tokenizer, args.max_length)
    return policy


def own_sft_policy(args, sft_dir, dist, tokenizer):
    """The SFT policy the user named with --sft-dir, taken as it is: a finished one."""
    sft_path = Path(sft_dir) / "ckpt.pt"
    ckpt = load_checkpoint(sft_path)
    check_stage(ckpt, sft_path, "sft", f"--sft-dir {sft_dir}")
    if not finished(ckpt):
        raise ArgumentError(f"--sft-dir {sft_dir}: its SFT run stopped at step {ckpt['step']} of "
                            f"{ckpt['args']['max_steps']}: finish it first, with `python train_sft.py --resume "
                            f"--out-dir {sft_dir}`")
    policy, ckpt = load_model(sft_path, dist.device, tokenizer, args.max_length)
    if dist.is_main:
        print(f"SFT policy: {sft_path} as it is (trained on {ckpt['args'].get('data') or 'the built-in task'})")
    return policy


def main(args: Args):
    dist = distributed.setup(args.device)
    train(args, dist)
    distributed.cleanup(dist)


if __name__ == "__main__":
    run(main, Args)
