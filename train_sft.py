"""Supervised fine-tuning: train a GPT to continue text, giving the starting policy.

With no arguments it trains a small GPT on the built-in task (short movie reviews) in
about a minute on 2 CPU cores; `--data file.jsonl` trains on your own text or prompt/completion
pairs. Runs alone or under `torchrun --nproc_per_node=N train_sft.py`.

    python train_sft.py                       # built-in task -> out/sft/ckpt.pt
    python train_sft.py --data my.jsonl --tokenizer gpt2 --block-size 256

The algorithm, in `train`:
  1. examples become token windows: a document is split into --block-size windows, a
     prompt + completion keeps its prompt as context only (`tokenize_sft` in
     minalign/data.py; `collate` sets the labels, IGNORE_INDEX where nothing is learnt);
  2. each step, the next-token cross-entropy, averaged over the trained tokens of the
     whole global batch (`sft_loss`), and one AdamW step on a cosine schedule.
"""

import math
import time
from pathlib import Path
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from minalign import data, distributed, ops, task
from minalign.checkpoint import (check_out_dir, check_stage, check_weights_finite, file_fingerprint, finished,
                                 load_checkpoint, remove_unfinished_saves, replace_earlier_run, rng_state,
                                 save_checkpoint, set_rng_state)
from minalign.cli import ArgumentError, check_args, check_divisible, check_finite, given, refuse_given, run
from minalign.data import IGNORE_INDEX
from minalign.logger import MetricsLogger, Progress, counted
from minalign.model import GPT, GPTConfig, evaluating
from minalign.optim import cosine_lr, make_optimizer, set_lr, warmup_note
from minalign.resume import NOT_RESUMED, note_saved, resumed_args, stopped_early, trained_on
from minalign.rollout import sample_texts
from minalign.tokenizer import TOKENIZERS, data_note, get_tokenizer


@dataclass
class Args:
    """Supervised fine-tuning of a GPT (the built-in review task by default)."""

    data: str | None = None
    """Training data: .txt (documents separated by blank lines) or .jsonl with {"text"} or
    {"prompt","completion"} per line, optionally .gz. None: the built-in review task."""
    tokenizer: str = "builtin"
    """Tokenizer: "builtin" (the review task's own BPE) or "gpt2"."""
    out_dir: str | None = None
    """Where checkpoints (ckpt.pt) and metrics.jsonl go (default out/sft, where the later
    stages look for their starting policy; with --data, out/sft-<data file name>)."""
    resume: bool = False
    """Continue the run in out_dir/ckpt.pt bit for bit: its settings (model shape, data,
    schedule), optimizer, step and RNG state. A flag left out takes the checkpoint's
    value; one given another value is refused, except --stop-at, --out-dir, --device,
    --compile and how often and how much to log, evaluate and sample."""
    val_fraction: float = 0.05
    """Share of --data held out for the validation loss, at least one example (the built-in
    task has its own split)."""
    n_layer: int = 4
    """Transformer blocks."""
    n_head: int = 4
    """Attention heads."""
    n_embd: int = 128
    """Model width."""
    block_size: int = 64
    """Longest training sequence in tokens: a longer document is trained in windows that
    cover all of it, a longer prompt + completion is truncated (both counted)."""
    dropout: float = 0.0
    """Dropout probability."""
    batch_size: int = 32
    """Sequences per optimizer step, summed over all processes."""
    max_steps: int = 800
    """Optimizer steps (the learning-rate schedule spans these)."""
    stop_at: int | None = None
    """Stop this invocation after this step, with a checkpoint (continue later with --resume)."""
    lr: float = 2e-3
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of the peak (cosine decay)."""
    warmup_steps: int = 50
    """Linear warmup steps."""
    weight_decay: float = 0.1
    """AdamW weight decay on matrices."""
    grad_clip: float = 1.0
    """Clip the gradient norm to this (0: no clipping)."""
    eval_interval: int = 200
    """Steps between validation losses, samples and checkpoints."""
    eval_examples: int = 512
    """Validation examples per evaluation."""
    log_interval: int = 20
    """Steps between progress lines."""
    num_samples: int = 3
    """Samples printed at each evaluation."""
    seed: int = 1337
    """Random seed (data order, init, dropout, sampling)."""
    device: str = "auto"
    """"auto" (CUDA if available), "cpu", "cuda" or "cuda:N"."""
    dtype: str = "auto"
    """Autocast dtype: "auto" (bfloat16 on a GPU that supports it, else float32), "float32", "bfloat16"."""
    compile: bool = False
    """torch.compile the model."""

    def __post_init__(self):
        check_args(self, positive=("n_layer", "n_head", "n_embd", "batch_size", "max_steps", "stop_at",
                                   "eval_interval", "eval_examples", "log_interval"),
                   non_negative=("lr", "warmup_steps", "weight_decay", "grad_clip", "num_samples"),
                   fractions=("val_fraction", "min_lr_ratio"),
                   choices={"tokenizer": TOKENIZERS, "dtype": ("auto", "float32", "bfloat16")})
        if not 0 <= self.dropout < 1:
            raise ArgumentError(f"--dropout {self.dropout}: must be in [0, 1), or nothing gets through")
        if self.val_fraction >= 1:
            raise ArgumentError(f"--val-fraction {self.val_fraction}: must be below 1, to leave data to train on")
        if self.block_size < 2:
            raise ArgumentError(f"--block-size {self.block_size}: a token and its successor need at least 2")
        if self.n_embd % self.n_head:
            raise ArgumentError(f"--n-embd {self.n_embd} must be a multiple of --n-head {self.n_head}")
        if self.data is None and not self.resume:  # a resumed run's data is the checkpoint's: see train()
            task.check_counts(self, val=("num_samples",))
        if self.out_dir is None:
            self.out_dir = "out/sft" if self.data is None else f"out/sft-{data.data_name(self.data)}"


# What a resumed run may set anew; every other setting continues as the checkpoint's run
# (minalign/resume.py).
RESUME_MAY_CHANGE = ("resume", "stop_at", "out_dir", "device", "compile", "log_interval", "eval_interval",
                     "eval_examples", "num_samples")


def autocast_context(device: str, dtype: str):
    """The context the forward passes run in for --dtype: autocast to bfloat16 or float16,
    or nothing for float32 ("auto": bfloat16 on a GPU that has it, else float32)."""
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") and torch.cuda.is_bf16_supported() else "float32"
    if dtype == "float32":
        return nullcontext()
    return torch.autocast(device_type=device.split(":")[0], dtype=getattr(torch, dtype))


def sft_loss(model, batch, scale):
    """scale times the sum of -log p(target) over the trained tokens of a batch.

    The loss is linear in the log-probs with weights known before the forward, so
    weighted_logprob_sum computes its gradient in the same pass and writes it over the
    logits (they are not read again).
    """
    logits, _ = model(batch["input_ids"])  # (B, T, Vp); right padding needs no attention mask
    labels = batch["labels"]  # (B, T), IGNORE_INDEX where no loss: those tokens add nothing
    weights = torch.ones(labels.shape, device=labels.device) * -scale  # scale: a number or a 0-d tensor
    return ops.weighted_logprob_sum(logits, labels, weights)


@torch.no_grad()
def val_loss_of(model, examples, tokenizer, batch_size, device, ctx) -> float:
    """The mean -log p(target) per trained token of `examples`, without dropout."""
    total, count = 0.0, 0
    with evaluating(model):
        for start in range(0, len(examples), batch_size):
            batch = data.collate(examples[start : start + batch_size], tokenizer.pad_id, device)
            with ctx:
                loss = sft_loss(model, batch, 1.0)
            total, count = total + loss.item(), count + (batch["labels"] != IGNORE_INDEX).sum().item()
    return total / max(count, 1)


def print_samples(model, tokenizer, prompts, block_size, seed):
    """A continuation of each prompt, as long as the block leaves room for; of a prompt
    longer than half the block, its last half-block of tokens (shown after "...")."""
    keep = block_size // 2
    token_lists = [tokenizer.encode(p) for p in prompts]
    was_cut = [len(tokens) > keep for tokens in token_lists]
    prompts = [tokenizer.decode(tokens[-keep:]) if cut else prompt
               for prompt, tokens, cut in zip(prompts, token_lists, was_cut)]
    if not prompts:
        return
    max_new = block_size - max(len(tokenizer.encode(p)) for p in prompts)  # as sample_texts encodes them
    for prompt, cut, text in zip(prompts, was_cut, sample_texts(model, tokenizer, prompts, max_new, seed=seed)):
        print(f"  sample: {'...' if cut else ''}{prompt + text!r}")


def continue_sft_run(args: Args, ckpt_path: str) -> tuple[Args, dict]:
    """(args, checkpoint) of the run that --resume continues: the checkpoint's settings
    (resume.resumed_args), refused if it is another stage's, finished, already past
    --stop-at, or its data file is gone."""
    ckpt = load_checkpoint(ckpt_path)
    check_stage(ckpt, ckpt_path, "sft", "--resume")
    saved = ckpt["args"]
    if args.data is not None and trained_on(ckpt, args.data):
        saved = {**saved, "data": args.data}  # the same file, wherever it is now
    args = resumed_args(args, saved, may_change=RESUME_MAY_CHANGE, own=NOT_RESUMED)
    if args.data is not None and "data" not in given(args) and not Path(args.data).exists():
        raise ArgumentError(f"--resume: the run's data file {args.data} is not there any more: pass --data "
                            f"and where it is now")
    if ckpt["step"] >= args.max_steps:
        raise ArgumentError(f"--resume: the run in {args.out_dir} finished at step {ckpt['step']}: nothing is "
                            f"left to train")
    if args.stop_at is not None and args.stop_at <= ckpt["step"]:
        raise ArgumentError(f"--stop-at {args.stop_at}: the run in {args.out_dir} is at step {ckpt['step']} already")
    return args, ckpt


def read_examples(args: Args, tokenizer) -> tuple[list[dict], list[dict], list[str]]:
    """(train, validation, prompts to sample from): the built-in task's splits, or the
    --data file's examples, a --val-fraction of them (whole documents) held out by --seed."""
    if args.data is None:
        train_raw = [{"text": r} for r in task.reviews("train")]
        val_raw = [{"text": r} for r in task.reviews("val")]
        return train_raw, val_raw, task.prompts("val", tokenizer, n=args.num_samples, seed=args.seed)
    raw = data.load_sft(args.data)
    train_raw, val_raw = data.held_out_split(raw, args.val_fraction, args.seed)
    if not train_raw:
        how = (" (a .txt file's documents are separated by blank lines; .jsonl holds one per line)"
               if len(raw) == 1 and data.is_text_file(args.data) else "")
        raise data.DataError(f"{args.data}: {counted(len(raw), 'example')}{how}, all held out by --val-fraction "
                             f"{args.val_fraction} (at least one is): give it more to train on")
    prompts = [ex.get("prompt") or tokenizer.decode(tokenizer.encode(ex["text"])[:4]) for ex in val_raw]
    return train_raw, val_raw, prompts[: args.num_samples]


def train(args: Args, dist: distributed.DistInfo) -> str:
    """Train; returns the checkpoint's path."""
    step = 0
    ckpt_path = f"{args.out_dir}/ckpt.pt"
    ckpt = None
    if args.resume:  # the run goes on with the checkpoint's settings and model shape
        args, ckpt = continue_sft_run(args, ckpt_path)
    if args.stop_at is not None and args.stop_at > args.max_steps:  # the run's own end comes first
        raise ArgumentError(f"--stop-at {args.stop_at}: the run ends at --max-steps {args.max_steps}; stop it "
                            f"earlier or leave --stop-at out")
    if args.data is None:
        refuse_given(args, ("val_fraction",), "applies to --data; the built-in task has its own validation split")
        task.check_counts(args, val=("num_samples",))
    check_divisible(args, ("batch_size",), dist.world_size)
    check_out_dir(args.out_dir, stage="sft")
    torch.manual_seed(args.seed)
    ctx = autocast_context(dist.device, args.dtype)
    tokenizer = get_tokenizer(args.tokenizer)
    config = GPTConfig(block_size=args.block_size, vocab_size=tokenizer.vocab_size, n_layer=args.n_layer,
                       n_head=args.n_head, n_embd=args.n_embd, dropout=args.dropout, pad_id=tokenizer.pad_id)
    if ckpt is not None:
        config = GPTConfig(**ckpt["model_config"])

    # ---- data: tokenised examples (input_ids + labels), truncation counted ----
    if args.data is not None:
        data.check_is_file(args.data)
    data_sha256 = None if args.data is None else file_fingerprint(args.data)  # a resumed run checks it is the same
    if ckpt is not None and ckpt.get("data_sha256", data_sha256) != data_sha256:
        raise data.DataError(f"{args.data} has changed since the run in {args.out_dir} began: it cannot "
                             f"go on as it started; train afresh without --resume")
    train_raw, val_raw, prompts = read_examples(args, tokenizer)
    train_examples, stats = data.tokenize_sft(train_raw, tokenizer, config.block_size)
    val_examples, val_stats = data.tokenize_sft(val_raw, tokenizer, config.block_size)
    evaluated = f" (the first {args.eval_examples} evaluated)" if len(val_examples) > args.eval_examples else ""
    if dist.is_main:
        print(f"data: {len(train_examples):,} train / {len(val_examples):,} val examples{evaluated}\n"
              f"  train: {stats}\n  val: {val_stats}")
        if note := data_note(args):
            print(note)
        if args.data is not None and (note := held_out_note(len(train_raw), len(val_raw), len(train_examples),
                                                            len(val_examples))):
            print(note)
    val_examples = val_examples[: args.eval_examples]

    # ---- model and optimizer ----
    model = GPT(config).to(dist.device)
    optimizer = make_optimizer(model, args.lr, args.weight_decay, device=dist.device)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        rng = ckpt["rng"]  # each process's (a checkpoint from before they were gathered: one)
        set_rng_state(rng[min(dist.rank, len(rng) - 1)] if isinstance(rng, list) else rng)
        step = ckpt["step"]
        note_saved(args.out_dir, step, resumable=True, world_size=dist.world_size)
        if dist.is_main:
            print(f"resumed from {ckpt_path} at step {step} of {args.max_steps}")
            remove_unfinished_saves(args.out_dir)
    if dist.is_main:
        print(f"model: {model.num_parameters() / 1e6:.2f}M parameters, {config}")
        if note := warmup_note(args.warmup_steps, args.max_steps):
            print(note)
    train_model = torch.compile(model) if args.compile else model
    if dist.enabled:
        train_model = DDP(train_model, device_ids=[dist.local_rank] if dist.device.startswith("cuda") else None)

    batches = distributed.Batches(len(train_examples), args.batch_size, seed=args.seed, rank=dist.rank, world_size=dist.world_size)
    if dist.is_main and batches.describe_left_out():
        print(f"batches of {args.batch_size}{batches.describe_left_out()}")
    if ckpt is None:
        replace_earlier_run(args.out_dir, dist)
    logger = MetricsLogger(args.out_dir, enabled=dist.is_main, resume_step=step if ckpt is not None else None)
    progress = Progress(args.max_steps, enabled=dist.is_main, start_step=step)

    def checkpoint(step: int, rng: list):
        save_checkpoint(ckpt_path, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                    "model_config": asdict(config), "step": step,
                                    "args": {**asdict(args), "data": args.data and str(Path(args.data).resolve())},
                                    "rng": rng, "tokenizer": tokenizer.name, "stage": "sft",
                                    "data_sha256": data_sha256})
        note_saved(args.out_dir, step, resumable=step < args.max_steps, world_size=dist.world_size)

    # ---- training loop ----
    t0, first_step = time.time(), step
    tokens_seen = torch.zeros((), dtype=torch.long, device=dist.device)  # read at the progress line only
    last_step = args.stop_at or args.max_steps
    for step in range(first_step + 1, last_step + 1):  # the step this pass completes
        lr = cosine_lr(step - 1, args.lr, args.max_steps, args.warmup_steps, args.min_lr_ratio)
        set_lr(optimizer, lr)
        batch = data.collate([train_examples[i] for i in batches.indices(step - 1)], tokenizer.pad_id, dist.device)
        # Mean over the global batch's tokens: DDP averages gradients over processes, so
        # scale by world_size / global token count to get exactly the single-process loss.
        n_tokens = (batch["labels"] != IGNORE_INDEX).sum()
        global_tokens = distributed.all_reduce_sum(n_tokens, dist)
        with ctx:
            loss = sft_loss(train_model, batch, dist.world_size / global_tokens.clamp(min=1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip or math.inf)
        optimizer.step()
        tokens_seen += global_tokens  # no wait for the device here

        if step % args.log_interval == 0 or step == last_step:
            train_loss = distributed.all_reduce_sum(loss.detach(), dist).item() / dist.world_size
            tok_per_s = int(tokens_seen) / (time.time() - t0)
            logger.log(step, loss=train_loss, lr=lr, grad_norm=grad_norm, tokens_per_s=tok_per_s)
            check_finite(step, loss=train_loss)
            progress.print(step, loss=train_loss, lr=lr, **{"tok/s": round(tok_per_s)})
        if step % args.eval_interval == 0 or step == last_step:
            # the main process evaluates and every process learns the result, so that all of
            # them stop alike if training diverged, before a checkpoint is written
            check_weights_finite(step, model)
            val_loss = val_loss_of(model, val_examples, tokenizer, 64, dist.device, ctx) if dist.is_main else 0.0
            val_loss = torch.tensor(val_loss, dtype=torch.float64, device=dist.device)
            val_loss = distributed.all_reduce_sum(val_loss, dist).item()
            check_finite(step, val_loss=val_loss)
            rng = distributed.gather_objects(rng_state(), dist)  # each process's: their batches differ
            if dist.is_main:
                logger.log(step, val_loss=val_loss)
                print(f"step {step}: val loss {val_loss:.4f}")
                checkpoint(step, rng)
                print_samples(model, tokenizer, prompts, config.block_size, args.seed)
    if dist.is_main and not stopped_early("train_sft.py", args.out_dir, step, args.max_steps):
        here = f" ({step - first_step:,} in this invocation)" if first_step else ""
        print(f"done: {counted(step, 'step')}{here} in {time.time() - t0:.0f}s; checkpoint at {ckpt_path}")
    distributed.barrier(dist)  # the other processes load the final checkpoint next
    return ckpt_path


def ensure(out_dir: str, dist: distributed.DistInfo, **overrides) -> str:
    """The SFT checkpoint in out_dir: reused when complete, resumed when a run was cut
    short, trained (with Args defaults plus `overrides`) when absent. For the later
    stages, which start from it."""
    check_out_dir(out_dir, "--sft-dir", stage="sft", read_finished=True)
    path = Path(out_dir) / "ckpt.pt"
    if path.exists():
        ckpt = load_checkpoint(path)
        wanted, found = overrides.get("data"), ckpt["args"].get("data")
        if not trained_on(ckpt, wanted):
            raise ArgumentError(f"{out_dir} holds an SFT policy trained on {found or 'the built-in task'}, not on "
                                f"{wanted or 'the built-in task'}: pass an --sft-dir that holds one trained on "
                                f"{wanted or 'the built-in task'}, or a new folder to train one in")
        if finished(ckpt):
            return str(path)
        # finished here (if the folder moved) on the data named now (if the file did)
        args = Args(**{**ckpt["args"], "data": wanted, "out_dir": out_dir, "resume": True, "stop_at": None})
    else:
        args = Args(out_dir=out_dir, **overrides)
    if dist.is_main:
        print(f"== SFT: {'resuming' if path.exists() else 'training'} the starting policy in {out_dir}")
    return train(args, dist)


def held_out_note(n_train: int, n_val: int, n_train_examples: int, n_val_examples: int) -> str | None:
    """A note when the documents held out whole (n_val of n_train + n_val) make far more
    of the examples than of the documents: long ones are split into many examples."""
    doc_share, example_share = n_val / (n_train + n_val), n_val_examples / (n_train_examples + n_val_examples)
    if example_share <= 2 * doc_share:
        return None
    return (f"note: the documents held out for validation ({counted(n_val, 'document')}, {doc_share:.0%}) hold "
            f"{example_share:.0%} of the examples: documents are held out whole, and long ones are split into "
            f"many examples; more, shorter documents would keep more to train on")


def main(args: Args):
    dist = distributed.setup(args.device)
    train(args, dist)
    distributed.cleanup(dist)


if __name__ == "__main__":
    run(main, Args)
