"""RLHF with PPO: the policy samples, the reward model scores, PPO updates the policy.

With no arguments it works on the built-in task end to end: it trains the SFT policy
and the reward model if out/ holds none, then runs PPO from the SFT policy with a
per-token KL penalty to it, logging the reward model's score beside the gold judge's
(the gap between them is how reward hacking shows itself), and evaluates the result
against SFT on held-out prompts, in the same table and eval.json as train_dpo.py (both
policies sampled at --temperature, which eval.json records: compare runs at one
temperature).

    python train_ppo.py
    python train_ppo.py --kl-coef 0.02 --updates 200     # weaker KL penalty, longer run
    python train_ppo.py --resume                         # continue a run that was cut short

Each update, in the loop of `main`:
  1. sample: the policy completes a batch of prompts (`rollout_prompts`, `sample`);
  2. score: the reward model scores each response, and the policy, the reference and the
     critic give their per-token log-probs and values (`prepare_update`);
  3. penalise: each response token's reward is -beta (log pi - log pi_ref), and the
     score is added to the last one's (`token_rewards` in minalign/ppo.py);
  4. GAE turns those rewards and the critic's values into advantages and returns, and
     the advantages are whitened over the batch (`advantages_and_returns`, same file);
  5. PPO: --epochs passes of minibatches over the rollout, with the clipped surrogate and
     the clipped value loss (`ops.ppo_policy_loss`, `ops.ppo_value_loss`).
"""

import copy
import math
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import train_rm
import train_sft
from minalign import distributed, ops, task
from minalign.checkpoint import (block_size_of, check_distinct, check_out_dir, check_weights_finite, load_model,
                                 save_checkpoint, weights_fingerprint)
from minalign.cli import ArgumentError, check_args, check_divisible, check_finite, refuse_given, run
from minalign.evaluate import (eval_metrics, evaluate_policy, format_samples, format_table, held_out_prompts,
                               write_eval)
from minalign.logger import MetricsLogger, Progress
from minalign.model import disable_dropout
from minalign.ppo import (AdaptiveKLController, advantages_and_returns, explained_variance, kl_estimate,
                          masked_mean, single_process, token_share)
from minalign.resume import check_same_model, continue_run, note_saved, save_due, start_or_resume, stopped_early
from minalign.rollout import check_room, response_logprobs, response_values, sample
from minalign.tokenizer import TOKENIZERS, get_tokenizer


@dataclass
class Args:
    """RLHF with PPO against a reward model (the built-in task by default)."""

    tokenizer: str = "builtin"
    """Tokenizer of the SFT and reward-model checkpoints."""
    out_dir: str = "out/ppo"
    """Where ckpt.pt, metrics.jsonl and eval.json go."""
    sft_dir: str = "out/sft"
    """SFT checkpoint folder, of a policy of the built-in task: the initial policy and the KL
    reference (trained if absent)."""
    rm_dir: str = "out/rm"
    """Reward-model checkpoint folder: the score, and the critic's initialisation (trained if absent)."""
    updates: int = 120
    """PPO updates (each: one rollout batch, then `epochs` passes over it)."""
    stop_at: int | None = None
    """Stop this invocation after this update, with a checkpoint (continue later with --resume)."""
    resume: bool = False
    """Continue the run in out_dir from its last checkpoint, bit for bit on the same kind of
    device and number of processes: policy, critic, optimizer, KL coefficient and sampling
    state. A flag left out takes the run's value; one given another value is refused,
    except --stop-at, --out-dir, --device, --sft-dir and --rm-dir (where the run's models
    are now: their weights must be the same), --save-interval, --log-interval,
    --eval-interval and --eval-prompts."""
    save_interval: int = 20
    """Updates between the checkpoints --resume continues from (one is also written at the
    last update, before the final evaluation; the final checkpoint, after it, holds the policy
    alone)."""
    rollout_batch_size: int = 64
    """Prompts sampled per update, summed over processes."""
    minibatch_size: int = 64
    """Sequences per gradient step within an update, summed over processes."""
    epochs: int = 4
    """Passes over each rollout batch (4, as in Huang et al. 2024, "The N+ Implementation
    Details of RLHF with PPO")."""
    max_new_tokens: int = 40
    """Longest sampled response."""
    temperature: float = 1.0
    """Sampling temperature. Log-probs (policy and reference) are taken at the same
    temperature, so the PPO ratio and the KL penalty are those of the sampling policy;
    the held-out evaluation samples at it too."""
    lr: float = 3e-5
    """Learning rate of policy and critic (AdamW), constant over the run (TRL's PPO trainer
    decays it linearly to 0 by default)."""
    kl_coef: float = 0.05
    """beta of the per-token KL penalty -beta * kl_t (initial value when --kl-target is set)."""
    kl_target: float | None = None
    """Adaptive beta toward this many nats of sequence KL (Ziegler et al. 2019); None keeps beta fixed."""
    kl_horizon: int = 10_000
    """Horizon of the adaptive controller, in samples."""
    kl_estimator: str = "k1"
    """How objective/kl and the adaptive controller measure the KL: "k1" (log ratio) or "k3"
    (never negative, less variance). The penalty in the reward is always k1: k3's policy
    gradient is not the KL's."""
    missing_eos_score: float | None = -1.0
    """Score that replaces the reward model's for a response that never emits EOS (None:
    keep it). TRL's missing_eos_penalty subtracts instead; this sets."""
    gamma: float = 1.0
    """GAE discount."""
    lam: float = 0.95
    """GAE lambda."""
    clip_eps: float = 0.2
    """PPO ratio clipping."""
    value_clip: float = 0.2
    """Value clipping (TRL's cliprange_value): a value's loss stops pulling it once it is
    this far from its value at the rollout. Above 0 (at 0 the critic could not learn); a
    large value such as 1e6 leaves it unclipped."""
    vf_coef: float = 0.1
    """Coefficient of the value loss in the summed loss. Policy and critic are separate
    models under Adam, which is blind to a gradient's scale, so this only sets where the
    critic's clipping engages (at a value-loss gradient norm of grad_clip / vf_coef); with
    a shared trunk (CleanRL's Atari PPO) it weighs the two losses against each other. Above 0 (at 0 the
    critic could not learn)."""
    grad_clip: float = 1.0
    """Clip each model's gradient norm to this (0: no clipping)."""
    eval_prompts: int = 200
    """Held-out prompts for each evaluation (the final one and every --eval-interval updates)."""
    eval_interval: int = 0
    """Also evaluate on the held-out prompts before training and every this many updates,
    logged as eval/* (gold reward, reward-model score, KL); 0: only at the end."""
    log_interval: int = 5
    """Updates between progress lines."""
    seed: int = 1337
    """Random seed."""
    device: str = "auto"
    """"auto" (CUDA if available), "cpu", "cuda" or "cuda:N"."""

    def __post_init__(self):
        check_args(self, positive=("updates", "stop_at", "save_interval", "rollout_batch_size", "minibatch_size",
                                   "epochs", "max_new_tokens", "temperature", "kl_target", "kl_horizon", "clip_eps",
                                   "value_clip", "vf_coef", "eval_prompts", "log_interval"),
                   non_negative=("lr", "kl_coef", "grad_clip", "eval_interval"),
                   fractions=("gamma", "lam"), choices={"tokenizer": TOKENIZERS, "kl_estimator": ("k1", "k3")})
        if self.rollout_batch_size > task.SPLITS["train"]:  # a slice of the prompts must fit
            raise ArgumentError(f"--rollout-batch-size {self.rollout_batch_size}: at most the "
                                f"{task.SPLITS['train']:,} training prompts")
        task.check_counts(self, test=("eval_prompts",))
        if self.minibatch_size > self.rollout_batch_size:
            raise ArgumentError(f"--minibatch-size {self.minibatch_size}: more than the --rollout-batch-size "
                                f"{self.rollout_batch_size} sequences there are")
        if self.rollout_batch_size % self.minibatch_size:  # one short minibatch would weigh its sequences more
            raise ArgumentError(f"--minibatch-size {self.minibatch_size} must divide --rollout-batch-size "
                                f"{self.rollout_batch_size}")
        if self.kl_target is not None and self.kl_coef == 0:
            raise ArgumentError("--kl-target: the controller scales --kl-coef, which is 0 and would stay 0")
        if self.missing_eos_score is not None and not math.isfinite(self.missing_eos_score):
            raise ArgumentError(f"--missing-eos-score {self.missing_eos_score}: must be finite")


def rollout_prompts(train_prompts: list[str], update: int, batch_size: int, dist) -> list[str]:
    """This process's share of update `update`'s prompts: successive updates take
    successive slices of `batch_size` prompts, wrapping round when one would run past
    the end of the list (the last slice may end at the last prompt), and each process
    takes its part of the slice, so any number of processes sample the prompts one
    process would."""
    start = (update - 1) * batch_size % (len(train_prompts) - batch_size + 1)  # 0 ... len - batch_size
    per_rank = batch_size // dist.world_size
    return train_prompts[start + dist.rank * per_rank : start + (dist.rank + 1) * per_rank]


@torch.no_grad()
def prepare_update(policy, reference, reward_model, critic, rollout, args, beta, eos_id, all_sum=single_process):
    """What PPO's update needs from a rollout: the old log-probs and values, the
    advantages and returns (all [B, N]), and the rollout's statistics. Under DDP,
    `all_sum` (a sum over processes) whitens the advantages over the global batch."""
    mask = rollout.response_mask  # (B, N): the response tokens, EOS included
    old = response_logprobs(policy, rollout, return_entropy=True, temperature=args.temperature)  # (B, N) each
    ref = response_logprobs(reference, rollout, temperature=args.temperature)
    values = response_values(critic, rollout) * mask  # (B, N)
    scores = reward_model(rollout.sequences, rollout.attention_mask)  # (B,) at each row's last real token
    # A response cut at --max-new-tokens (no EOS) is scored as it stands, or given
    # --missing-eos-score; either way its episode ends at its last token, with no value
    # after it, as in TRL.
    ended = rollout.ended(eos_id)  # (B,)
    if args.missing_eos_score is not None:
        scores = torch.where(ended, scores, torch.full_like(scores, args.missing_eos_score))
    log_ratio = kl_estimate(old.token_logps, ref.token_logps, "k1") * mask  # (B, N): the penalty (minalign/ppo.py)
    advantages, returns = advantages_and_returns(scores, log_ratio, values, mask, beta, args.gamma, args.lam,
                                                 all_sum=all_sum)
    seq_kl = (kl_estimate(old.token_logps, ref.token_logps, args.kl_estimator) * mask).sum(1)  # (B,) measured
    non_score_reward = -beta * log_ratio.sum(1)  # (B,)
    stats = {
        "objective/kl": seq_kl.mean().item(),
        # the exact entropy of each next-token distribution, summed over the response (TRL
        # logs -log p of the sampled tokens, the same in expectation but noisier, and counts
        # -1 for each padding token after an early EOS)
        "objective/entropy": (old.entropy * mask).sum(1).mean().item(),
        "objective/non_score_reward": non_score_reward.mean().item(),
        "objective/rlhf_reward": (scores + non_score_reward).mean().item(),
        "objective/scores": scores.mean().item(),  # after --missing-eos-score (eval/rm_score: before)
        "val/num_eos_tokens": ended.sum().item(),
        "response_length": mask.sum(1).float().mean().item(),
    }
    return old.token_logps, values, advantages, returns, stats


def minibatch_stats(pg, vf, logprobs, old_logprobs, mask) -> dict:
    """One minibatch's losses and health figures, under TRL's names: the mean probability
    ratio pi / pi_old over its real tokens (about 1 before the first step of each update:
    a minibatch's forward pass may round differently from the whole batch's).
    Means are over real tokens only: TRL's approxkl and ratio also count the padding
    (difference 0, ratio 1 there), so its figures sit closer to 0 and 1."""
    ratio = masked_mean(torch.exp(logprobs.detach() - old_logprobs), mask)
    return {"loss/policy_avg": pg.loss.item(), "loss/value_avg": vf.loss.item(),
            "policy/clipfrac_avg": pg.clipfrac.item(), "policy/approxkl_avg": pg.approx_kl.item(),
            "val/clipfrac_avg": vf.clipfrac.item(), "val/ratio": ratio.item()}


def held_out_eval(policy, reference, reward_model, tokenizer, args, logger, update, **extra) -> dict:
    """Gold reward, reward-model score, win rate and KL on the held-out prompts, with
    `extra` figures, logged as eval/* (by `logger`, if given)."""
    prompts = held_out_prompts(tokenizer, args.eval_prompts, args.seed)
    result = evaluate_policy(policy, reference, tokenizer, prompts, args.max_new_tokens, seed=args.seed,
                             reward_model=reward_model, temperature=args.temperature)  # what PPO trained
    result.update(extra)
    if logger is not None:
        logger.log(update, **eval_metrics(result))
    print(f"eval @ update {update}: gold {result['gold_reward']:.3f} | reward model {result['rm_score']:.3f} | "
          f"KL {result['kl']:.2f} | win rate {result['win_rate']:.3f}", flush=True)
    return result


# The progress line: its name for a figure, the figure, and the digits it is rounded to.
PROGRESS = {"score": ("objective/scores", 3), "gold": ("objective/gold_scores", 3), "kl": ("objective/kl", 2),
            "clipfrac": ("policy/clipfrac_avg", 3), "explained_var": ("losses/explained_variance", 2),
            "len": ("response_length", 1), "rollout tok/s": ("rollout_tokens_per_s", None)}


# What a resumed run may set anew; every other setting continues as the checkpoint's run
# (minalign/resume.py). --sft-dir and --rm-dir left out are the run's folders.
RESUME_MAY_CHANGE = ("resume", "stop_at", "out_dir", "device", "sft_dir", "rm_dir", "save_interval", "eval_prompts",
                     "eval_interval", "log_interval")


def continue_ppo_run(args: Args, dist):
    """(args, checkpoint) of the run that --resume continues, as resume.continue_run gives
    them, refused before any work if it cannot go on bit for bit: in another number of
    processes or on another kind of device (each process's sampling state is the
    device's own), or from other models than it started from."""
    args, ckpt = continue_run(args, "ppo", RESUME_MAY_CHANGE, unit="update")
    saved = ckpt["resume"]
    n = len(saved["generators"])
    if n != dist.world_size:
        if n == 1:
            ran, how = "one process", "in one, without torchrun"
        else:
            ran, how = f"{n} processes, each from its own random stream", f"in as many, with torchrun --nproc_per_node={n}"
        raise ArgumentError(f"--resume: the run in {args.out_dir} sampled in {ran}: continue it {how}")
    if saved["sampling_device"] != torch.device(dist.device).type:
        raise ArgumentError(f"--resume: the run in {args.out_dir} sampled on {saved['sampling_device']}, whose "
                            f"random stream another device cannot continue: pass --device {saved['sampling_device']}")
    check_same_model(ckpt, "sft", "--sft-dir", args.sft_dir, "SFT policy")  # before ensure() could train one there
    check_same_model(ckpt, "rm", "--rm-dir", args.rm_dir, "reward model")
    return args, ckpt


def check_run(args: Args, dist) -> None:
    """Refuse, before any work, flags that do not fit together and output folders that
    cannot be written."""
    if args.stop_at is not None and args.stop_at > args.updates:
        raise ArgumentError(f"--stop-at {args.stop_at}: the run ends at --updates {args.updates}; stop it earlier "
                            f"or leave --stop-at out")
    if args.kl_target is None:
        refuse_given(args, ("kl_horizon",), "sets the adaptive KL controller's pace: give --kl-target too")
    check_divisible(args, ("rollout_batch_size", "minibatch_size"), dist.world_size)
    check_out_dir(args.out_dir, stage="ppo")
    check_out_dir(args.rm_dir, "--rm-dir", stage="rm", read_finished=True)  # now, not after training the SFT policy
    check_distinct(out_dir=args.out_dir, sft_dir=args.sft_dir, rm_dir=args.rm_dir)


def check_models_room(args: Args, tokenizer, train_prompts: list[str]) -> None:
    """Room for prompt + response in the policy that samples the rollouts and in the reward
    model that scores them (the critic is its copy): refused now, not after training one."""
    sft_block = block_size_of(args.sft_dir, default=train_sft.Args().block_size)
    rm_block = block_size_of(args.rm_dir, default=sft_block)  # one trained below starts from the SFT policy
    for model, folder, block in (("the SFT policy", args.sft_dir, sft_block),
                                 ("the reward model", args.rm_dir, rm_block)):
        check_room(block, tokenizer, train_prompts, args.max_new_tokens, "--max-new-tokens", f"{model} in {folder}")


def load_models(args: Args, dist, tokenizer):
    """(policy, reference, reward_model, critic): the policy and its frozen reference from
    the SFT checkpoint, the frozen reward model, and the critic, a trainable copy of the
    reward model. The SFT policy and the reward model are trained first if absent."""
    sft_path = train_sft.ensure(args.sft_dir, dist, tokenizer=args.tokenizer, device=args.device)
    # loaded (and its tokenizer checked) before a reward model is trained from it
    policy, _ = load_model(sft_path, dist.device, tokenizer)
    rm_path = train_rm.ensure(args.rm_dir, dist, tokenizer=args.tokenizer, sft_dir=args.sft_dir, device=args.device)
    disable_dropout(policy)  # the ratio and KL compare log-probs taken at different times
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    reward_model, _ = load_model(rm_path, dist.device, tokenizer)
    reward_model.eval().requires_grad_(False)
    critic = disable_dropout(copy.deepcopy(reward_model)).train().requires_grad_(True)  # initialised from the RM
    return policy.train(), reference, reward_model, critic


def main(args: Args):
    dist = distributed.setup(args.device)
    ckpt = None
    if args.resume:
        args, ckpt = continue_ppo_run(args, dist)
    check_run(args, dist)
    torch.manual_seed(args.seed)
    tokenizer = get_tokenizer(args.tokenizer)
    train_prompts = task.prompts("train", tokenizer, seed=args.seed + 3)
    check_models_room(args, tokenizer, train_prompts)
    policy, reference, reward_model, critic = load_models(args, dist, tokenizer)
    started_from = {"sft": weights_fingerprint(reference), "rm": weights_fingerprint(reward_model)}
    if ckpt is not None:
        critic.load_state_dict(ckpt["resume"]["critic"])  # the policy: by start_or_resume below

    # One AdamW over both models, at torch's default betas (0.9, 0.999) and no weight decay,
    # as TRL's PPO trainer; Adam normalises each parameter's step, so the summed loss below
    # trains each model on its own loss.
    optimizer = torch.optim.AdamW([*policy.parameters(), *critic.parameters()], lr=args.lr, weight_decay=0.0)
    train_policy = DDP(policy) if dist.enabled else policy
    train_critic = DDP(critic) if dist.enabled else critic
    kl_ctl = AdaptiveKLController(args.kl_coef, args.kl_target, args.kl_horizon)
    generator = torch.Generator(device=dist.device).manual_seed(args.seed + dist.rank)
    first, seconds_before = start_or_resume(ckpt, args.out_dir, dist, policy, optimizer, args.updates, unit="update")
    if ckpt is not None:
        kl_ctl.value = ckpt["resume"]["kl_coef"]
        generator.set_state(ckpt["resume"]["generators"][dist.rank])
    logger = MetricsLogger(args.out_dir, enabled=dist.is_main, resume_step=first - 1 if ckpt is not None else None)
    progress = Progress(args.updates, enabled=dist.is_main, unit="update", start_step=first - 1)
    minibatch_per_rank = args.minibatch_size // dist.world_size
    all_sum = partial(distributed.all_reduce_sum, info=dist)  # a sum over processes (the value itself alone)
    last = args.stop_at or args.updates
    negative_kl_warned = False
    if args.eval_interval and ckpt is None:
        distributed.on_main(dist, held_out_eval, policy, reference, reward_model, tokenizer, args, logger, 0)
    t0, eval_seconds = time.time(), 0.0  # eval_seconds: left out of eps and train_seconds

    def save(update: int, resumable: bool):
        """The policy in out_dir/ckpt.pt; with `resumable`, what --resume needs besides
        (then every process calls it: each holds its own sampling state)."""
        generators = distributed.gather_objects(generator.get_state(), dist) if resumable else None
        if not dist.is_main:
            return
        state = {"model": policy.state_dict(), "model_config": asdict(policy.config), "args": asdict(args),
                 "step": update, "tokenizer": tokenizer.name, "stage": "ppo"}
        if resumable:
            state["resume"] = {"critic": critic.state_dict(), "optimizer": optimizer.state_dict(),
                               "kl_coef": kl_ctl.value, "generators": generators,
                               "sampling_device": torch.device(dist.device).type, "started_from": started_from,
                               "train_seconds": seconds_before + time.time() - t0 - eval_seconds}
        save_checkpoint(Path(args.out_dir) / "ckpt.pt", state)
        note_saved(args.out_dir, update, resumable, unit="update", world_size=dist.world_size)

    for update in range(first, last + 1):
        # ---- rollout: sample, then score with the reward model, reference and critic ----
        prompts = rollout_prompts(train_prompts, update, args.rollout_batch_size, dist)
        t_roll = time.time()
        rollout = sample(policy, tokenizer, prompts, args.max_new_tokens, generator, temperature=args.temperature)
        roll_tokens = rollout.response_mask.sum().item()
        rollout_seconds = time.time() - t_roll
        old_logps, old_values, advantages, returns, stats = prepare_update(
            policy, reference, reward_model, critic, rollout, args, kl_ctl.value, tokenizer.eos_id, all_sum=all_sum)
        mask = rollout.response_mask

        # ---- PPO: several epochs of minibatches over this rollout ----
        B = len(prompts)
        history = defaultdict(list)  # per minibatch, averaged over the update
        shuffle = torch.Generator().manual_seed(args.seed + update)
        order = torch.randperm(B, generator=shuffle)
        for epoch in range(args.epochs):
            if epoch and minibatch_per_rank < B:  # new minibatches each epoch (one holding all needs none)
                order = torch.randperm(B, generator=shuffle)
            for i in range(0, B, minibatch_per_rank):
                idx = order[i : i + minibatch_per_rank].to(dist.device)  # (b,) rows of this minibatch
                mb, mb_mask = rollout.rows(idx), mask[idx]  # mb_mask (b, N)
                mb_old_logps, mb_advantages, mb_old_values, mb_returns = (
                    t[idx] for t in (old_logps, advantages, old_values, returns))  # (b, N) each
                new = response_logprobs(train_policy, mb, temperature=args.temperature, inplace_backward=True)
                values = response_values(train_critic, mb)  # (b, N), like new.token_logps
                pg = ops.ppo_policy_loss(new.token_logps, mb_old_logps, mb_advantages, mb_mask, args.clip_eps)
                vf = ops.ppo_value_loss(values, mb_old_values, mb_returns, mb_mask, args.value_clip)
                # token means of this rank's share, weighed so that DDP's average of the ranks'
                # gradients (and reduce_metrics' of their figures) is the global minibatch's
                share = token_share(mb_mask, dist.world_size, all_sum)
                loss = (pg.loss + args.vf_coef * vf.loss) * share
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(policy.parameters(), args.grad_clip or math.inf)
                torch.nn.utils.clip_grad_norm_(critic.parameters(), args.grad_clip or math.inf)
                optimizer.step()
                for name, value in minibatch_stats(pg, vf, new.token_logps, mb_old_logps, mb_mask).items():
                    history[name].append(value * share)
        stats.update({name: sum(values) / len(values) for name, values in history.items()})
        stats.update({
            "losses/explained_variance": explained_variance(old_values, returns, mask, all_sum),
            "kl_coef": kl_ctl.value,
            "rollout_tokens_per_s": roll_tokens / rollout_seconds,
            # TRL's eps: episodes per second, of this invocation
            "eps": (update - first + 1) * args.rollout_batch_size / (time.time() - t0 - eval_seconds),
        })
        # the gold judge beside the proxy: where they part, the policy is exploiting the reward model
        texts = [p + r for p, r in zip(prompts, rollout.response_texts(tokenizer))]
        stats["objective/gold_scores"] = sum(task.gold_reward(texts)) / len(texts)
        # this rank's rollouts -> the global batch's; every process then moves beta alike
        stats = distributed.reduce_metrics(stats, dist, summed=["val/num_eos_tokens", "rollout_tokens_per_s"])
        kl_ctl.update(stats["objective/kl"], args.rollout_batch_size)
        if stats["objective/kl"] < 0 and not negative_kl_warned and dist.is_main:
            print(f"note: update {update}'s mean KL estimate is negative: with k1 and a small batch this happens by "
                  f"chance; --kl-estimator k3 measures it with less variance (never negative), and a larger "
                  f"--rollout-batch-size steadies the penalty too", file=sys.stderr, flush=True)
            negative_kl_warned = True
        logger.log(update, **stats)
        check_finite(update, "update", **{k: stats[k] for k in ("loss/policy_avg", "loss/value_avg", "objective/kl")})
        check_weights_finite(update, policy, critic, counter="update")  # the next rollout samples from the policy
        if update % args.log_interval == 0 or update == last:
            progress.print(update, **{name: round(stats[key], digits) for name, (key, digits) in PROGRESS.items()})
        if args.eval_interval and update % args.eval_interval == 0 and update < args.updates:
            eval_seconds += distributed.on_main(dist, held_out_eval, policy, reference, reward_model, tokenizer, args,
                                                logger, update)
        if save_due(update, last, args.save_interval):
            save(update, resumable=True)  # after the update's evaluation, which a resumed run does not repeat

    if dist.is_main and not stopped_early("train_ppo.py", args.out_dir, last, args.updates, unit="update"):
        # the last update's checkpoint holds everything: --resume finishes an evaluation cut short
        train_seconds = seconds_before + time.time() - t0 - eval_seconds
        result = held_out_eval(policy, reference, reward_model, tokenizer, args, None, args.updates,
                               train_seconds=train_seconds)
        print(format_table("PPO", result))
        print(format_samples("PPO", result))
        print(f"wrote {write_eval(args.out_dir, result)}")  # before the final checkpoint, which ends the run
        save(args.updates, resumable=False)
        logger.log(args.updates, **eval_metrics(result))  # after it: logged once
    distributed.cleanup(dist)


if __name__ == "__main__":
    run(main, Args)
