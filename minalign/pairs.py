"""Preference pairs for train_rm.py and train_dpo.py: the settings both take, the
default folders named after the pairs, the pairs as tokens and batches, and what
--resume checks of them.

The pairs are the built-in task's (sampled from the SFT policy, labelled by the gold
judge: minalign/preferences.py) or a file's; train_rm.prepare_pairs makes or reads them.
"""

import hashlib
import json
import math
from dataclasses import dataclass
from typing import ClassVar

from minalign import data, distributed, task
from minalign.cli import ArgumentError, check_args
from minalign.logger import counted
from minalign.optim import warmup_note
from minalign.preferences import SAMPLES_PER_PROMPT
from minalign.resume import check_same_model, check_started_from, continue_run
from minalign.tokenizer import TOKENIZERS


@dataclass
class PairArgs:
    """Where the preference pairs come from, and the run settings train_rm.py and
    train_dpo.py share."""

    stage: ClassVar[str]  # "rm" or "dpo": names the default folders
    # the flags that make or judge the built-in pairs, refused with --data
    builtin_only: ClassVar[tuple[str, ...]] = ("pairs_dir", "label_temperature", "n_train_prompts",
                                               "n_test_prompts", "n_train_pairs", "label_flip")

    data: str | None = None
    """Preference pairs, .jsonl(.gz) with {"prompt","chosen","rejected"} or HH-RLHF's
    {"chosen","rejected"}. None: the built-in task's pairs, made by the SFT policy."""
    tokenizer: str = "builtin"
    """Tokenizer: "builtin" or "gpt2"."""
    out_dir: str | None = None
    """Where ckpt.pt, metrics.jsonl and eval.json go (default out/<stage>, with what differs from the
    default pairs appended: out/rm-t0.5, out/dpo-n1000-flip0.1, out/rm-<data file name>)."""
    sft_dir: str | None = None
    """SFT checkpoint folder, trained there if absent (default out/sft, or with --data
    out/sft-<data name>: 300 steps of 16 on the chosen responses of the training pairs;
    for other settings, train one with train_sft.py --data and name it here)."""
    pairs_dir: str = "out/pairs"
    """Built-in task: where the generated pairs are cached (a subfolder per labelling)."""
    label_temperature: float | None = None
    """Built-in task: None ranks pairs by gold score; t > 0 draws Bradley-Terry labels
    with p = sigmoid(delta gold / t) (noisy, like annotators)."""
    n_train_prompts: int = 1000
    """Built-in task: training prompts (4 samples each, up to 6 pairs)."""
    n_test_prompts: int = 200
    """Built-in task: held-out prompts for evaluation."""
    n_train_pairs: int | None = None
    """Built-in task: train on a random subset of this many pairs (None: all of them)."""
    label_flip: float = 0.0
    """Built-in task: give this share of the training pairs the wrong label (held-out pairs stay clean)."""
    test_fraction: float = 0.1
    """--data: share of pairs held out for evaluation."""
    max_length: int = 64
    """Longest prompt + response in tokens (longer pairs are truncated and counted)."""
    batch_size: int = 32
    """Pairs per optimizer step, summed over processes."""
    stop_at: int | None = None
    """Stop this invocation after this step, with a checkpoint (continue later with --resume)."""
    resume: bool = False
    """Continue the run in out_dir from its last checkpoint (each script says what it holds)."""
    save_interval: int = 100
    """Steps between the checkpoints --resume continues from (one is also written at the last
    step, before the final evaluation; the final checkpoint, after it, holds the model alone)."""
    warmup_steps: int = 20
    """Linear warmup steps."""
    grad_clip: float = 1.0
    """Clip the gradient norm to this (0: no clipping)."""
    log_interval: int = 10
    """Steps between progress lines."""
    seed: int = 1337
    """Random seed."""
    device: str = "auto"
    """"auto" (CUDA if available), "cpu", "cuda" or "cuda:N"."""

    def __post_init__(self):
        check_args(self, positive=("label_temperature", "n_train_prompts", "n_test_prompts", "n_train_pairs",
                                   "max_length", "batch_size", "stop_at", "save_interval", "log_interval"),
                   non_negative=("warmup_steps", "grad_clip"), fractions=("label_flip",),
                   choices={"tokenizer": TOKENIZERS})
        if not 0 < self.test_fraction < 1:
            raise ArgumentError(f"--test-fraction {self.test_fraction}: must be between 0 and 1, both left out")
        if self.data is None:
            task.check_counts(self, train=("n_train_prompts",), test=("n_test_prompts",), max_length=("max_length",))
            most = self.n_train_prompts * math.comb(SAMPLES_PER_PROMPT, 2)  # fewer when samples tie
            if self.n_train_pairs is not None and self.n_train_pairs > most:
                raise ArgumentError(f"--n-train-pairs {self.n_train_pairs}: --n-train-prompts {self.n_train_prompts} "
                                    f"give at most {most} pairs; raise --n-train-prompts")
            pairs = most if self.n_train_pairs is None else self.n_train_pairs
            if self.batch_size > pairs:
                raise ArgumentError(f"--batch-size {self.batch_size}: more than the {pairs} training pairs at most")
            check_stop_at(self, pairs, at_most=True)  # (self.epochs: each script's own)
        self.out_dir = default_folders(self)[0]  # --sft-dir stays as given: None or the user's own folder

    def sft_folder(self) -> str:
        """--sft-dir, or the default folder named after the pairs."""
        return default_folders(self)[1]


# What a resumed run may set anew; every other setting continues as the checkpoint's run
# (minalign/resume.py). --data, --sft-dir and --pairs-dir left out are the run's.
RESUME_MAY_CHANGE = ("resume", "stop_at", "out_dir", "device", "data", "sft_dir", "pairs_dir", "save_interval",
                     "log_interval")


def continue_pair_run(args: PairArgs, may_change=RESUME_MAY_CHANGE):
    """(args, checkpoint) of the reward-model or DPO run that --resume continues, as
    resume.continue_run gives them, refused before any work (no pairs made, no SFT policy
    trained) if its SFT policy is not there any more or --stop-at is past its end. The
    run's SFT folder stays the one it used: a default one is named after the --data
    file, which may have been renamed."""
    args, ckpt = continue_run(args, args.stage, may_change)
    if args.sft_dir is None:
        args.sft_dir = ckpt["resume"]["sft_folder"]
    check_same_model(ckpt, "sft", "--sft-dir", args.sft_dir, "SFT policy")
    check_stop_at(args, ckpt["resume"]["n_pairs"])
    return args, ckpt


def check_same_pairs(ckpt: dict, args: PairArgs, train_raw: list[dict], test_raw: list[dict]) -> None:
    """Refuse to continue a run whose pairs are not those it started from."""
    check_started_from(ckpt, {"pairs": pairs_fingerprint(train_raw, test_raw)},
                       {"pairs": f"the preference pairs of {args.data or args.pairs_dir}"})


def pairs_fingerprint(*splits: list[dict]) -> str:
    """A short hash of preference pairs (each split a list of {"prompt", "chosen",
    "rejected"}), to tell whether a resumed run has the pairs it began with."""
    text = json.dumps([[[p["prompt"], p["chosen"], p["rejected"]] for p in split] for split in splits])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def default_folders(args: PairArgs) -> tuple[str, str]:
    """(out_dir, sft_dir): as given, or named after the stage and what goes in, so that
    runs on other pairs never overwrite (or reuse) the default ones: out/rm, out/rm-t0.5
    (noisy labels), out/dpo-n1000-flip0.1, out/rm-<data file name> with its own
    out/sft-<data file name>."""
    name = args.stage
    if args.data is None:
        stem = "" if args.label_temperature is None else f"-t{args.label_temperature:g}"
        stem += "" if args.n_train_pairs is None else f"-n{args.n_train_pairs}"
        stem += f"-flip{args.label_flip:g}" if args.label_flip else ""
        default_out, default_sft = f"out/{name}{stem}", "out/sft"  # one SFT policy for all
    else:
        stem = f"-{data.data_name(args.data)}"
        default_out, default_sft = f"out/{name}{stem}", f"out/sft{stem}"
    return (default_out if args.out_dir is None else args.out_dir,
            default_sft if args.sft_dir is None else args.sft_dir)


def run_steps(args: PairArgs, n_pairs: int) -> int:
    """Optimizer steps of an --epochs run over n_pairs training pairs (each epoch's short
    last batch is left out)."""
    return max(1, int(args.epochs * (n_pairs // args.batch_size)))


def check_stop_at(args: PairArgs, n_pairs: int, at_most: bool = False) -> None:
    """Refuse a --stop-at past the end of a run over n_pairs training pairs (with
    `at_most`, the most there can be, for a check before the pairs are made)."""
    if args.stop_at is not None and args.stop_at > run_steps(args, n_pairs):
        steps = run_steps(args, n_pairs)
        if at_most:
            ends, pairs = f"by step {steps}", f"at most {counted(n_pairs, 'pair')}"
        else:
            ends, pairs = f"at step {steps}", counted(n_pairs, "pair")
        raise ArgumentError(f"--stop-at {args.stop_at}: the run ends {ends} ({pairs}, "
                            f"--batch-size {args.batch_size}, --epochs {args.epochs:g}); stop it earlier or leave "
                            f"--stop-at out")


def pair_batches(args: PairArgs, dist, n_pairs: int, title: str) -> tuple[distributed.Batches, int]:
    """Each process's batches of an --epochs run over n_pairs training pairs, and its
    number of steps; the run's header line is printed."""
    batches = distributed.Batches(n_pairs, args.batch_size, seed=args.seed, rank=dist.rank, world_size=dist.world_size)
    total_steps = run_steps(args, n_pairs)
    check_stop_at(args, n_pairs)
    if dist.is_main:
        print(f"== {title}: {counted(total_steps, 'step')} of {args.batch_size} pairs"
              f"{batches.describe_left_out('pairs')}")
        if note := warmup_note(args.warmup_steps, total_steps):
            print(note)
    return batches, total_steps


def tokenize_splits(args, tokenizer, train_raw, test_raw, is_main: bool):
    """Token pairs of both splits, with what was truncated or skipped printed; a split
    left empty (every pair identical once truncated) is refused."""
    train_pairs, stats = data.tokenize_pairs(train_raw, tokenizer, args.max_length)
    test_pairs, test_stats = data.tokenize_pairs(test_raw, tokenizer, args.max_length)
    if is_main:
        print(f"pairs: {len(train_pairs):,} train / {len(test_pairs):,} test\n  train: {stats}\n  test: {test_stats}")
    for name, pairs, raw in (("training", train_pairs, train_raw), ("held-out", test_pairs, test_raw)):
        if not pairs:
            why = (f"none of the {len(raw)} is left: chosen and rejected are the same within --max-length "
                   f"{args.max_length}" if raw else "there are none")
            raise data.DataError(f"{args.data or 'the built-in pairs'}: no {name} pairs: {why}")
    return train_pairs, test_pairs
