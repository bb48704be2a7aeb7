"""Preference pairs for the built-in task, labelled by the gold judge.

As in the DPO paper's IMDb experiment (Rafailov et al. 2023, section 6.1; the procedure is in appendix C.1): for each
prompt, sample 4 completions from the SFT policy (full distribution, temperature 1),
score each with the gold judge, and form all 6 pairs, the higher score chosen. Pairs
with equal scores carry no preference: they are dropped and counted. Two equal
completions make the same pair twice, as sampling them twice says they are likely;
a completion cut at max_new_tokens is judged, and trained, as the text it is: with no
EOS after it (each pair records whether its responses ended).

With `label_temperature` t the labels are noisy instead, like human annotators: a
pair (a, b) is labelled "a preferred" with the Bradley-Terry probability

    p = sigmoid((gold(a) - gold(b)) / t),

drawn at random. No model can then beat the Bayes-optimal accuracy, the mean over
pairs of max(p, 1 - p); reward-model accuracy is judged against it.

Pairs are cached as JSONL in the standard {"prompt", "chosen", "rejected"} format
(plus the gold scores, p and whether each response ended), so the scripts and users read
the same files.
"""

import itertools
import json
import math
import random
from pathlib import Path

from minalign import data, task
from minalign.checkpoint import weights_fingerprint
from minalign.rollout import sample_completions

SAMPLES_PER_PROMPT = 4  # the DPO paper's IMDb setting: 4 completions, all 6 pairs
PAIR_FIELDS = {"prompt": str, "chosen": str, "rejected": str,  # a labelled pair, as label_pairs makes it
               "chosen_gold": (int, float), "rejected_gold": (int, float), "p_chosen": (int, float),
               "chosen_ended": bool, "rejected_ended": bool}


def label_pairs(prompt: str, completions: list[str], scores: list[float], rng: random.Random,
                label_temperature: float | None = None, ended: list[bool] | None = None) -> tuple[list[dict], int]:
    """All pairs of one prompt's completions, labelled; returns (pairs, ties dropped).
    `ended`: whether each completion ended with EOS (all of them, when None)."""
    ended = ended if ended is not None else [True] * len(completions)
    pairs, ties = [], 0
    for i, j in itertools.combinations(range(len(completions)), 2):
        if scores[i] == scores[j] or completions[i] == completions[j]:
            ties += 1
            continue
        if label_temperature is None:  # ranked: the better one is chosen
            p_i = 1.0 if scores[i] > scores[j] else 0.0
            i_chosen = p_i == 1.0
        else:  # Bradley-Terry noise
            # sigmoid(d / t) as 0.5 (1 + tanh(d / 2t)): no overflow for a tiny t
            p_i = 0.5 * (1.0 + math.tanh((scores[i] - scores[j]) / (2 * label_temperature)))
            i_chosen = rng.random() < p_i
        c, r = (i, j) if i_chosen else (j, i)
        pairs.append({
            "prompt": prompt, "chosen": completions[c], "rejected": completions[r],
            "chosen_gold": scores[c], "rejected_gold": scores[r], "chosen_ended": ended[c], "rejected_ended": ended[r],
            "p_chosen": p_i if i_chosen else 1.0 - p_i,  # probability of this label
        })
    return pairs, ties


def make_pairs(policy, tokenizer, prompts: list[str], n_samples: int = SAMPLES_PER_PROMPT, max_new_tokens: int = 48,
               label_temperature: float | None = None, seed: int = 0, batch_size: int = 64,
               progress=None) -> tuple[list[dict], dict]:
    """Sample `n_samples` completions per prompt, judge them, label all pairs.

    Returns (pairs, stats) with stats counting prompts, pairs and dropped ties."""
    repeated = [p for p in prompts for _ in range(n_samples)]  # prompt-major: samples of one prompt together
    completions, ended = [], []
    for start in range(0, len(repeated), batch_size * 8):
        chunk = repeated[start : start + batch_size * 8]
        texts, flags = sample_completions(policy, tokenizer, chunk, max_new_tokens, batch_size, seed=seed + start)
        completions += texts
        ended += flags
        if progress:
            progress(len(completions), len(repeated))
    scores = task.gold_reward([p + c for p, c in zip(repeated, completions)])
    rng = random.Random(seed)
    pairs, ties = [], 0
    for k, prompt in enumerate(prompts):
        block = slice(k * n_samples, (k + 1) * n_samples)
        new, dropped = label_pairs(prompt, completions[block], scores[block], rng, label_temperature, ended[block])
        pairs += new
        ties += dropped
    stats = {"prompts": len(prompts), "samples": len(repeated), "pairs": len(pairs), "ties_dropped": ties}
    return pairs, stats


def bayes_optimal_accuracy(pairs: list[dict]) -> float:
    """Mean of max(p, 1 - p): the best accuracy any model can reach on these labels."""
    return sum(max(p["p_chosen"], 1 - p["p_chosen"]) for p in pairs) / max(len(pairs), 1)


def select_pairs(pairs: list[dict], n: int | None = None, flip: float = 0.0, seed: int = 0) -> tuple[list[dict], int]:
    """A seeded random subset of `n` pairs (all of them when None), with round(flip * n)
    of them, chosen at random, given the wrong label: chosen and rejected swapped (with
    their gold scores and ends; p_chosen becomes 1 - p). Returns (pairs, how many were flipped).

    Experiments use it to ask how much data a reward model needs, and what label noise
    does to every method downstream."""
    if n is not None and not 0 < n <= len(pairs):
        raise ValueError(f"asked for {n} pairs, but there are {len(pairs)}")
    if not 0.0 <= flip <= 1.0:
        raise ValueError(f"the share of flipped labels must lie in [0, 1], not {flip}")
    rng = random.Random(seed)
    chosen = rng.sample(range(len(pairs)), n) if n is not None else list(range(len(pairs)))
    subset = [dict(pairs[i]) for i in chosen]
    n_flip = round(flip * len(subset))
    for pair in rng.sample(subset, n_flip):
        for key in ("", "_gold", "_ended"):  # the responses, with their gold scores and ends
            if "chosen" + key in pair:
                pair["chosen" + key], pair["rejected" + key] = pair["rejected" + key], pair["chosen" + key]
        if "p_chosen" in pair:
            pair["p_chosen"] = 1.0 - pair["p_chosen"]
        pair["flipped"] = True
    return subset, n_flip


def write_jsonl(path, rows: list[dict]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    tmp.replace(path)  # atomic: a half-written cache is never read


def builtin_pairs(pairs_dir, policy, tokenizer, n_train_prompts: int, n_test_prompts: int,
                  label_temperature: float | None, max_new_tokens: int, seed: int, is_main: bool = True,
                  barrier=lambda: None) -> tuple[list[dict], list[dict]]:
    """(train, test) pairs of the built-in task, read from `pairs_dir` or made there.

    Train pairs come from the prompts of the task's train-split reviews, test pairs
    from the test split's: the reviews are disjoint, but their openings (2 to 8 tokens)
    recur, so most test prompts also open some training review; held-out figures
    measure unseen reviews and completions, not unseen openings. In a distributed run
    rank 0 makes the files while the others wait at `barrier`, then all read them.
    """
    pairs_dir = Path(pairs_dir)
    settings = {"n_train_prompts": n_train_prompts, "n_test_prompts": n_test_prompts,
                "label_temperature": label_temperature, "max_new_tokens": max_new_tokens, "seed": seed,
                "tokenizer": tokenizer.name, "policy": weights_fingerprint(policy),
                "fields": sorted(PAIR_FIELDS)}  # files of an older format are made again
    meta_path = pairs_dir / "meta.json"
    try:
        cached = meta_path.exists() and data.read_record(meta_path).get("settings") == settings
    except data.DataError:  # damaged: made again
        cached = False
    if is_main and cached:
        print(f"== pairs: reusing {pairs_dir} (made by this SFT policy with these settings)")
    if is_main and not cached:
        meta_path.unlink(missing_ok=True)  # until the new files are complete, nothing here matches
        print(f"== pairs: sampling {SAMPLES_PER_PROMPT} SFT completions per prompt, judging them -> {pairs_dir}")
        meta = {"settings": settings}
        for split, n, offset in (("train", n_train_prompts, 0), ("test", n_test_prompts, 1)):
            prompts = task.prompts(split, tokenizer, n=n, seed=seed + offset)
            pairs, stats = make_pairs(policy, tokenizer, prompts, SAMPLES_PER_PROMPT, max_new_tokens,
                                      label_temperature, seed + 1000 * offset,
                                      progress=lambda done, total: print(f"  {split}: {done:,}/{total:,} samples",
                                                                         flush=True))
            write_jsonl(pairs_dir / f"{split}.jsonl", pairs)
            meta[split] = stats
            print(f"  {split}: {stats['pairs']:,} pairs from {stats['samples']:,} samples of {stats['prompts']:,} "
                  f"prompts ({stats['ties_dropped']:,} tied pairs dropped)")
        meta_path.write_text(json.dumps(meta, indent=1))
    barrier()
    counts = data.read_record(meta_path)
    splits = []
    for split in ("train", "test"):
        path = pairs_dir / f"{split}.jsonl"
        rows = data.read_rows(path, PAIR_FIELDS)
        expected = counts.get(split, {}).get("pairs")
        if len(rows) != expected:  # a file cut short at a line's end reads as fewer pairs
            raise data.DataError(f"{path}: {len(rows)} pairs where {meta_path} counts {expected}: "
                                 f"remove {pairs_dir} to make them again")
        splits.append(rows)
    return splits
