"""Direct Preference Optimisation: align the SFT policy to preference pairs, no reward model.

With no arguments it works on the built-in task end to end: it trains the SFT policy
if out/sft holds none, samples and judges preference pairs if out/pairs holds none,
runs DPO (the reference log-probs are computed once, before training), then evaluates
the policy against SFT on held-out prompts with the gold judge: mean gold reward, win
rate, sequence KL to the reference and response length, printed as a table and
written to out/dpo/eval.json.

    python train_dpo.py
    python train_dpo.py --beta 0.5 --loss-type ipo
    python train_dpo.py --data ../shared/data/hh-rlhf/harmless-base-test.jsonl.gz --tokenizer gpt2 --max-length 128
    python train_dpo.py --resume                          # continue a run that was cut short

The algorithm, in `main`:
  1. the reference (the SFT policy, frozen) gives each pair's chosen and rejected
     log-probs once, before training: summed over the response tokens, EOS included
     (`reference_logps` in minalign/dpo.py; means per token for IPO);
  2. each step, the policy gives the same log-probs for a batch of pairs, chosen and
     rejected in one [2B, T] forward pass (`pair_logps`);
  3. the DPO loss, -log sigmoid(beta [(log pi - log pi_ref)(chosen) - (log pi -
     log pi_ref)(rejected)]), or one of its relatives (`ops.dpo_loss`; its spec is
     `dpo_loss` in minalign/reference.py); no reward model, no sampling.
"""

import copy
import time
from dataclasses import asdict, dataclass
from typing import ClassVar
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import train_sft
from minalign import data, distributed, dpo, ops
from minalign.checkpoint import block_size_of, check_weights_finite, save_checkpoint, weights_fingerprint
from minalign.cli import ArgumentError, check_args, check_finite, run
from minalign.data import IGNORE_INDEX
from minalign.dpo import pair_logps, reference_logps
from minalign.evaluate import (eval_metrics, evaluate_policy, format_samples, format_table, held_out_prompts,
                               write_eval)
from minalign.logger import MetricsLogger, Progress
from minalign.model import disable_dropout, evaluating
from minalign.optim import cosine_lr, make_optimizer, set_lr
from minalign.pairs import (PairArgs, check_same_pairs, continue_pair_run, pair_batches, pairs_fingerprint,
                            tokenize_splits)
from minalign.pairs import RESUME_MAY_CHANGE as PAIR_RESUME_MAY_CHANGE
from minalign.resume import note_saved, save_due, start_or_resume, stopped_early
from minalign.rollout import check_room
from minalign.tokenizer import get_tokenizer
from train_rm import prepare_pairs  # shared with train_rm.py


@dataclass
class Args(PairArgs):
    """Train a policy with DPO on preference pairs (the built-in task by default)."""

    stage: ClassVar[str] = "dpo"
    builtin_only: ClassVar[tuple[str, ...]] = (*PairArgs.builtin_only, "eval_interval", "eval_max_new_tokens")

    beta: float = 0.1
    """Strength of the implicit KL constraint: small beta lets the policy move further."""
    loss_type: str = "sigmoid"
    """"sigmoid" (DPO), "ipo" (on length-normalised log-probs, as in TRL), "hinge" (SLiC/RSO) or "robust"."""
    label_smoothing: float = 0.0
    """Assumed share of flipped labels, for "sigmoid" (conservative DPO) and "robust"."""
    epochs: float = 1.0
    """Passes over the training pairs."""
    lr: float = 2e-4
    """Peak learning rate."""
    eval_max_new_tokens: int = 48
    """Built-in task: longest sampled response in the evaluation."""
    eval_interval: int = 0
    """Built-in task: also evaluate with the gold judge before training and every this many
    steps, logged as eval/* (gold reward, win rate, KL); 0: only at the end."""
    resume: bool = False
    """Continue the run in out_dir from its last checkpoint: policy, optimizer, step and the
    reference log-probs. A flag left out takes the run's value; one given another value
    is refused, except --stop-at, --out-dir, --device, --data, --sft-dir and --pairs-dir
    (where the run's pairs and SFT policy are now: they must be the same), --save-interval,
    --log-interval, --eval-interval and --eval-max-new-tokens."""

    def __post_init__(self):
        super().__post_init__()
        check_args(self, positive=("beta", "epochs", "eval_max_new_tokens"), non_negative=("lr", "eval_interval"),
                   choices={"loss_type": ops.DPO_LOSS_TYPES})
        if not 0 <= self.label_smoothing < 0.5:
            raise ArgumentError(f"--label-smoothing {self.label_smoothing}: must be in [0, 0.5)")
        if self.label_smoothing and self.loss_type in ("ipo", "hinge"):
            raise ArgumentError(f"--label-smoothing applies to the sigmoid and robust losses, not {self.loss_type}")


# What a resumed run may set anew besides what a reward-model run may (minalign/pairs.py)
RESUME_MAY_CHANGE = (*PAIR_RESUME_MAY_CHANGE, "eval_interval", "eval_max_new_tokens")


def dpo_metrics(out, chosen_logps, rejected_logps) -> dict:
    """TRL's DPO metric names, from a dpo_loss result and the policy log-probs [B] it was
    given (per-token means for IPO, sums otherwise, as TRL logs them)."""
    return {
        "loss": out.losses.mean().item(),
        "rewards/chosen": out.chosen_rewards.mean().item(),
        "rewards/rejected": out.rejected_rewards.mean().item(),
        "rewards/accuracies": (out.chosen_rewards > out.rejected_rewards).float().mean().item(),
        "rewards/margins": (out.chosen_rewards - out.rejected_rewards).mean().item(),
        "logps/chosen": chosen_logps.mean().item(),
        "logps/rejected": rejected_logps.mean().item(),
    }


@torch.no_grad()
def held_out_metrics(model, pairs, ref_logps, args, pad_id, device, batch_size=64) -> dict:
    """The DPO metrics over held-out pairs (`ref_logps` [n, 2] their reference log-probs),
    each a mean over all the pairs, under TRL's names (logged with the eval/ prefix that
    TRL's logs get in W&B and TensorBoard)."""
    rows = []
    with evaluating(model):
        for start in range(0, len(pairs), batch_size):
            batch = data.collate_pairs(pairs[start : start + batch_size], pad_id, device)
            chosen_logps, rejected_logps = pair_logps(model, batch, dpo.uses_mean_logps(args.loss_type))  # (b,) each
            ref_batch = ref_logps[start : start + batch_size].to(device)  # (b, 2)
            ref_chosen_logps, ref_rejected_logps = ref_batch.unbind(1)  # (b,) each
            out = ops.dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, args.beta,
                               args.loss_type, args.label_smoothing)
            rows.append((len(chosen_logps), dpo_metrics(out, chosen_logps, rejected_logps)))
    n = sum(k for k, _ in rows)
    return {key: sum(k * m[key] for k, m in rows) / n for key in rows[0][1]}


def gold_eval(policy, reference, tokenizer, args, device, logger=None, step=0) -> dict:
    """Built-in task: the policy's samples on held-out prompts against the reference's,
    judged by the gold judge (`reference` is kept on the CPU between evaluations)."""
    prompts = held_out_prompts(tokenizer, args.n_test_prompts, args.seed)
    result = evaluate_policy(policy, reference.to(device), tokenizer, prompts, args.eval_max_new_tokens,
                             seed=args.seed)
    reference.cpu()
    if logger is not None:
        logger.log(step, **eval_metrics(result))
        print(f"eval @ step {step}: gold {result['gold_reward']:.3f} | KL {result['kl']:.2f} | "
              f"win rate {result['win_rate']:.3f}", flush=True)
    return result


def main(args: Args):
    dist = distributed.setup(args.device)
    ckpt = None
    if args.resume:
        args, ckpt = continue_pair_run(args, RESUME_MAY_CHANGE)
    torch.manual_seed(args.seed)
    if args.data is None:  # the gold evaluation samples: make sure it can, before any pairs or SFT are made
        block_size = block_size_of(args.sft_folder(), default=train_sft.Args().block_size)  # or the one trained below
        tokenizer = get_tokenizer(args.tokenizer)
        check_room(block_size, tokenizer, held_out_prompts(tokenizer, args.n_test_prompts, args.seed),
                   args.eval_max_new_tokens, "--eval-max-new-tokens")
    policy, tokenizer, train_raw, test_raw = prepare_pairs(args, dist)
    disable_dropout(policy)  # so the implicit rewards start at 0, as the reference is the policy
    if ckpt is not None:
        check_same_pairs(ckpt, args, train_raw, test_raw)
    started_from = {"sft": weights_fingerprint(policy), "pairs": pairs_fingerprint(train_raw, test_raw)}
    train_pairs, test_pairs = tokenize_splits(args, tokenizer, train_raw, test_raw, dist.is_main)
    batches, total_steps = pair_batches(args, dist, len(train_pairs), f"DPO ({args.loss_type}, beta {args.beta})")

    # The reference is the SFT policy, frozen: its log-probs of every pair are all DPO needs
    # from it, so compute them once (a resumed run has them in its checkpoint); only the
    # policy is on the device while training. A copy of the SFT policy waits on the CPU
    # for the gold evaluation, which samples from both.
    per_token = dpo.uses_mean_logps(args.loss_type)  # mean log-probs (IPO) or sums (the others)
    sft_policy = copy.deepcopy(policy).cpu() if args.data is None else None
    if ckpt is None:
        t_ref = time.time()
        ref_train = reference_logps(policy, train_pairs, tokenizer.pad_id, per_token, verbose=dist.is_main,
                                    dist=dist)  # (n, 2)
        ref_test = reference_logps(policy, test_pairs, tokenizer.pad_id, per_token, dist=dist)  # (n_test, 2)
        if dist.is_main:
            print(f"reference log-probs of {len(train_pairs) + len(test_pairs):,} pairs in "
                  f"{time.time() - t_ref:.1f}s")
    else:
        ref_train, ref_test = ckpt["resume"]["ref_train"], ckpt["resume"]["ref_test"]

    optimizer = make_optimizer(policy, args.lr, weight_decay=0.0, device=dist.device)
    train_model = DDP(policy) if dist.enabled else policy
    # after every check, so that a run refused leaves the earlier one in out_dir as it was
    first, seconds_before = start_or_resume(ckpt, args.out_dir, dist, policy, optimizer, total_steps)
    logger = MetricsLogger(args.out_dir, enabled=dist.is_main, resume_step=first - 1 if ckpt is not None else None)
    progress = Progress(total_steps, enabled=dist.is_main, start_step=first - 1)
    last = args.stop_at or total_steps

    gold_evals = args.eval_interval and args.data is None  # on the main process; the others wait
    if gold_evals and ckpt is None:
        distributed.on_main(dist, gold_eval, policy, sft_policy, tokenizer, args, dist.device, logger, 0)
    t0, eval_seconds = time.time(), 0.0  # eval_seconds: left out of steps_per_s and train_seconds

    def save(step: int, resumable: bool):
        """The policy in out_dir/ckpt.pt; with `resumable`, what --resume needs besides."""
        state = {"model": policy.state_dict(), "model_config": asdict(policy.config), "args": asdict(args),
                 "step": step, "tokenizer": tokenizer.name, "stage": "dpo"}
        if resumable:
            state["resume"] = {"optimizer": optimizer.state_dict(), "ref_train": ref_train, "ref_test": ref_test,
                               "started_from": started_from, "sft_folder": args.sft_folder(),
                               "n_pairs": len(train_pairs),
                               "train_seconds": seconds_before + time.time() - t0 - eval_seconds}
        save_checkpoint(Path(args.out_dir) / "ckpt.pt", state)
        note_saved(args.out_dir, step, resumable, world_size=dist.world_size)

    for step in range(first, last + 1):
        lr = cosine_lr(step - 1, args.lr, total_steps, args.warmup_steps)
        set_lr(optimizer, lr)
        idx = batches.indices(step - 1)
        batch = data.collate_pairs([train_pairs[i] for i in idx], tokenizer.pad_id, dist.device)
        chosen_logps, rejected_logps = pair_logps(train_model, batch, per_token)  # (B,) each
        ref_chosen_logps, ref_rejected_logps = ref_train[idx].to(dist.device).unbind(1)  # (B,) each
        out = ops.dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, args.beta,
                           args.loss_type, args.label_smoothing)
        loss = out.losses.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), args.grad_clip or float("inf"))
        optimizer.step()
        if step % args.log_interval == 0 or step == last:
            labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])  # (2B, T)
            lengths = (labels != IGNORE_INDEX).sum(1).float().mean().item()  # of both responses, as PPO's
            metrics = {**dpo_metrics(out, chosen_logps, rejected_logps), "response_length": lengths,
                       "grad_norm": grad_norm.item(), "lr": lr,
                       "steps_per_s": (step - first + 1) / (time.time() - t0 - eval_seconds)}
            metrics = distributed.reduce_metrics(metrics, dist)  # this rank's pairs -> the global batch's
            logger.log(step, **metrics)
            check_finite(step, loss=metrics["loss"])
            progress.print(step, loss=round(metrics["loss"], 4), acc=round(metrics["rewards/accuracies"], 3),
                           margin=round(metrics["rewards/margins"], 3), **{"steps/s": round(metrics["steps_per_s"], 2)})
        if gold_evals and step % args.eval_interval == 0 and step < total_steps:
            check_weights_finite(step, policy)  # it samples from them
            eval_seconds += distributed.on_main(dist, gold_eval, policy, sft_policy, tokenizer, args, dist.device,
                                                logger, step)
        if save_due(step, last, args.save_interval):
            check_weights_finite(step, policy)
            if dist.is_main:  # after the step's evaluation, which a resumed run does not repeat
                save(step, resumable=True)
    train_seconds = seconds_before + time.time() - t0 - eval_seconds
    check_weights_finite(last, policy)

    if dist.is_main and not stopped_early("train_dpo.py", args.out_dir, last, total_steps):
        # the last step's checkpoint holds everything: --resume finishes an evaluation cut short
        results = held_out_metrics(policy, test_pairs, ref_test, args, tokenizer.pad_id, dist.device)
        print("held-out pairs: " + ", ".join(f"{k} {v:.3f}" for k, v in results.items()))
        results["train_seconds"] = train_seconds
        if args.data is None:  # the gold judge: better reviews than SFT, at what KL?
            gold = gold_eval(policy, sft_policy, tokenizer, args, dist.device)
            results.update(gold)
            print(format_table("DPO", gold))
            print(format_samples("DPO", gold))
        print(f"wrote {write_eval(args.out_dir, results)}")  # before the final checkpoint, which ends the run
        save(total_steps, resumable=False)
        logger.log(total_steps, **eval_metrics(results))  # after it: logged once
    distributed.cleanup(dist)


if __name__ == "__main__":
    run(main, Args)
