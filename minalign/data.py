"""Data: read SFT examples and preference pairs, tokenize them, collate batches.

Files (plain, or gzipped when the name ends in .gz):

- SFT, .txt: documents separated by blank lines; every token but a document's first is trained.
- SFT, .jsonl: one {"text": ...} (a document) or {"prompt": ..., "completion": ...}
  per line; the prompt is context only, the loss is on the completion.
- Pairs, .jsonl: {"prompt", "chosen", "rejected"}, chosen and rejected being
  responses to the prompt; or {"chosen", "rejected"} alone, two whole conversations
  in HH-RLHF's form ("\\n\\nHuman: ...\\n\\nAssistant: ..."): the prompt is their shared
  text up to and including the last "\\n\\nAssistant:" they both have. A response
  left empty by that split (the assistant said nothing) is kept and counted.

Bad input stops with a DataError naming the file and line ("pairs.jsonl:17: missing
key 'rejected'"): malformed JSON, a missing key, a value that is not a string or is
empty, bytes that are not UTF-8. Nothing is dropped silently: what is changed or
skipped on purpose is counted in DataStats, which the trainers print.

Tokens (the contract with the trainers). An example is prompt tokens + response
tokens + EOS. A batch is a dict of [B, T] tensors, right-padded with PAD:

    input_ids       int64  the tokens
    attention_mask  bool   True on real tokens, False on padding
    labels          int64  labels[b, t] = input_ids[b, t + 1] where that next token
                           belongs to the response (its EOS included), else -100
                           (prompt, padding, the last position)

so the loss is cross_entropy(logits[b, t], labels[b, t]) with ignore_index=-100, no
shifting needed. A batch of pairs holds the same keys twice, prefixed "chosen_" and
"rejected_", both padded to one length so they can go through the model as one
[2B, T] batch. Prompts for generation are left-padded instead (collate_prompts), so
every row's next token comes at the same position.

Truncation to max_length tokens: when prompt + response does not fit, the prompt
gives up its start first (the end of a conversation matters most), but keeps at
least max_length // 2 tokens (or all it has); then the response is cut at max_length
and so loses its EOS. A document longer than max_length is split into consecutive
windows that overlap by one token, so every token but the first is trained once.
"""

import gzip
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from minalign.reference import IGNORE_INDEX  # labels that take no part in the loss
ASSISTANT = "\n\nAssistant:"  # HH-RLHF's turn marker that ends an implicit prompt


class DataError(ValueError):
    """Bad input data; the message starts with "file:line:"."""


@dataclass
class DataStats:
    """What reading and tokenizing did to the data, for the trainers to print."""

    n_examples: int = 0  # examples (or pairs) produced
    n_prompt_truncated: int = 0  # prompts that lost their start to fit max_length
    n_response_truncated: int = 0  # responses (or chosen/rejected) cut at max_length
    n_documents_split: int = 0  # documents longer than max_length, split into windows
    n_skipped_identical_pairs: int = 0  # pairs with chosen == rejected (after truncation)
    n_implicit_prompt_mismatch: int = 0  # implicit-prompt pairs that differ before their
    # last "\n\nAssistant:": split at the last one they share, so a response spans turns
    n_empty_responses: int = 0  # responses with no text: kept (their tokens: EOS alone)
    n_blank_lines: int = 0  # lines of a .jsonl file with no record on them
    n_prompt_repeated: int = 0  # explicit-prompt pairs whose chosen and rejected both begin
    # with the prompt: whole texts, perhaps, where responses were meant (kept as they are)
    first_prompt_repeated: str = ""  # "file:line" of the first of them

    def __str__(self) -> str:
        """What the scripts print, e.g. "1,000 kept; 12 prompts truncated"; counts of 0 left out."""
        parts = []
        for name, (noun, what) in _STATS_WORDING.items():
            n = getattr(self, name)
            if n:
                nouns = noun if n == 1 else noun + "s"
                parts.append(f"{n:,} {nouns} {what}".rstrip())
        kept = f"{self.n_examples:,} kept"
        return f"{kept}; {', '.join(parts)}" if parts else kept


_STATS_WORDING = {  # DataStats field: (noun, what happened to it)
    "n_prompt_truncated": ("prompt", "truncated"),
    "n_response_truncated": ("response", "truncated"),
    "n_documents_split": ("document", "split into windows"),
    "n_skipped_identical_pairs": ("pair", "skipped (chosen == rejected once truncated)"),
    "n_implicit_prompt_mismatch": ("pair", "split at the last Assistant turn both share"),
    "n_empty_responses": ("empty response", ""),
    "n_blank_lines": ("blank line", "skipped"),
    "n_prompt_repeated": ("pair", "whose chosen and rejected begin with the prompt"),
}


def repeated_prompt_note(stats: DataStats) -> str | None:
    """A note when pairs with a 'prompt' repeat it at the start of both responses."""
    n = stats.n_prompt_repeated
    if not n:
        return None
    return (f"note: {n:,} pair{'s' if n > 1 else ''} (the first at {stats.first_prompt_repeated}) begin both chosen "
            f"and rejected with the 'prompt': with a 'prompt', they hold the responses alone, which the prompt "
            f"comes before, so it is read twice; if they are whole texts, remove the prompt from them")


@dataclass
class Example:
    input_ids: list[int]
    n_prompt: int  # the first n_prompt ids are context, never a training target
    source: int | None = None  # index of the row (example or pair) it was made from


# ---------------------------------------------------------------------------------
# Reading files


def _lines(path: Path):
    """Yield (line number, text) for each line of a plain or gzipped UTF-8 file."""
    check_is_file(path)
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rb") as f:
        lineno = 0
        try:
            for lineno, raw in enumerate(f, start=1):
                try:
                    yield lineno, raw.decode("utf-8-sig")  # -sig: a byte-order mark is not text
                except UnicodeDecodeError as e:
                    raise DataError(f"{path}:{lineno}: not UTF-8 (byte {raw[e.start]:#04x})") from None
        except (gzip.BadGzipFile, EOFError) as e:  # EOFError: a truncated .gz
            raise DataError(f"{path}:{lineno + 1}: bad gzip data ({e})") from None


def check_is_file(path: str | Path) -> None:
    """Refuses a data file that is missing or a folder, naming it."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: a folder, not a data file")
    if not path.exists():
        raise DataError(f"{path}: no such file")


def _format(path: Path) -> str:
    """"txt" or "jsonl", by the file's suffix in any case (a folder or a missing file is
    refused as such first)."""
    check_is_file(path)
    if is_text_file(path):
        return "txt"
    if path.name.lower().removesuffix(".gz").endswith((".jsonl", ".json")):
        return "jsonl"
    raise DataError(f"{path}: unknown format, expected .txt or .jsonl (optionally .gz)")


def is_text_file(path: str | Path) -> bool:
    """Whether `path` names a .txt file (optionally .gz), whose documents are separated by
    blank lines."""
    return Path(path).name.lower().removesuffix(".gz").endswith(".txt")


def _records(path: Path, stats: DataStats | None = None):
    """Yield ("file:line", object) for each non-blank line of a JSONL file (blank ones are
    counted in `stats`)."""
    for lineno, line in _lines(path):
        if not line.strip():  # holds no record
            if stats is not None:
                stats.n_blank_lines += 1
            continue
        where = f"{path}:{lineno}"
        try:
            record = json.loads(line.rstrip("\r\n"))  # a column past the end is on this line, not the next
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: malformed JSON ({e.msg}, column {e.colno}); "
                            f"expected one JSON object per line") from None
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
        yield where, record


def _text(record: dict, key: str, where: str, allow_empty: bool = False) -> str:
    """record[key], which must be a string, and not a blank one unless allow_empty."""
    if key not in record:
        raise DataError(f"{where}: missing key {key!r}")
    value = record[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: {key!r} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise DataError(f"{where}: {key!r} is empty")
    return value


def data_name(path: str | Path) -> str:
    """A data file's name without its folder and data suffixes ("a/hh.test.jsonl.gz" ->
    "hh.test"): the scripts name their default output folders after it."""
    name = Path(path).name
    for suffix in (".gz", ".jsonl", ".json", ".txt"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
    return name


def load_sft(path: str | Path) -> list[dict]:
    """SFT examples from a .txt or .jsonl file (plain or .gz): a list of {"text"} and
    {"prompt", "completion"} dicts, as in the JSONL format (a .txt document is a "text")."""
    path = Path(path)
    examples = []
    if _format(path) == "txt":
        lines = []  # of the current document
        for _, line in _lines(path):
            if line.strip():
                lines.append(line.rstrip("\r\n"))
            elif lines:
                examples.append({"text": "\n".join(lines)})
                lines = []
        if lines:
            examples.append({"text": "\n".join(lines)})
    else:
        for where, record in _records(path):
            has_text, has_pair = "text" in record, "prompt" in record or "completion" in record
            if {"chosen", "rejected"} <= record.keys() and not {"text", "completion"} & record.keys():
                raise DataError(f"{where}: a preference pair ('chosen', 'rejected'), for train_rm.py and "
                                f"train_dpo.py; SFT takes 'text', or 'prompt' and 'completion'")
            if has_text == has_pair:
                raise DataError(f"{where}: expected either 'text', or 'prompt' and 'completion'"
                                f"{' (not both)' if has_text else ''}")
            if has_text:
                examples.append({"text": _text(record, "text", where)})
            else:
                prompt, completion = _text(record, "prompt", where), _text(record, "completion", where)
                examples.append({"prompt": prompt, "completion": completion})
    if not examples:
        raise DataError(f"{path}: no examples")
    return examples


def read_record(path: str | Path) -> dict:
    """A JSON object this project wrote beside its outputs (a cache's settings, say);
    a damaged one stops the run with one line naming it."""
    try:
        record = json.loads(Path(path).read_text())
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise DataError(f"{path}: damaged ({e}): remove it, or its folder, to make it again") from None
    if not isinstance(record, dict):
        raise DataError(f"{path}: damaged (not a JSON object): remove it, or its folder, to make it again")
    return record


def read_rows(path: str | Path, fields: dict[str, type | tuple[type, ...]] | None = None) -> list[dict]:
    """The JSON objects of a .jsonl file this project wrote (a cache of pairs, say), each
    holding a value of the given type under every key of `fields`; a damaged one stops
    the run with its line."""
    rows = []
    for lineno, line in _lines(Path(path)):
        remedy = "remove the file's folder to make it again"
        try:
            row = json.loads(line)
        except ValueError as e:
            raise DataError(f"{path}:{lineno}: damaged ({e}): {remedy}") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{lineno}: damaged (not a JSON object): {remedy}")
        wrong = [key for key, kind in (fields or {}).items()
                 if not isinstance(row.get(key), kind) or (isinstance(row.get(key), bool) and kind is not bool)]
        # (JSON's true is no number)
        if wrong:
            raise DataError(f"{path}:{lineno}: damaged ({', '.join(map(repr, wrong))} missing or not of its type): "
                            f"{remedy}")
        rows.append(row)
    return rows


def split_implicit_prompt(chosen: str, rejected: str) -> tuple[str, bool] | None:
    """The prompt of an HH-RLHF pair: their shared text up to and including the last
    "\\n\\nAssistant:" in it; None if they share none. Also says whether that is the
    last "\\n\\nAssistant:" of both texts. In HH-RLHF harmless-base test it is for
    2,307 of 2,312 pairs; in the other 5 one text goes on for more turns (4 chosen,
    1 rejected), and that text's response holds a further "\\n\\nAssistant:"."""
    shared = os.path.commonprefix([chosen, rejected])
    start = shared.rfind(ASSISTANT)
    if start < 0:
        return None
    is_last_turn = chosen.rfind(ASSISTANT) == start == rejected.rfind(ASSISTANT)
    return shared[: start + len(ASSISTANT)], is_last_turn


def load_pairs(path: str | Path) -> tuple[list[dict], DataStats]:
    """Preference pairs from a .jsonl file (plain or .gz), explicit or implicit prompt,
    as {"prompt", "chosen", "rejected"} dicts whose chosen and rejected are responses
    (the prompt is not repeated in them); and the stats of the implicit prompts."""
    path = Path(path)
    if _format(path) != "jsonl":
        raise DataError(f"{path}: preference pairs must be .jsonl (optionally .gz)")
    pairs, stats = [], DataStats()
    for where, record in _records(path, stats):
        if not {"chosen", "rejected"} & record.keys() and {"text", "completion"} & record.keys():
            raise DataError(f"{where}: an SFT example ('text', or 'prompt' and 'completion'), for train_sft.py; "
                            f"preference pairs take 'chosen' and 'rejected' (and optionally 'prompt')")
        # a response may be empty (the model stopped at once: its tokens are just EOS)
        chosen, rejected = (_text(record, key, where, allow_empty=True) for key in ("chosen", "rejected"))
        if "prompt" in record:
            prompt = _text(record, "prompt", where)
            stats.n_empty_responses += (not chosen.strip()) + (not rejected.strip())
            if chosen.startswith(prompt) and rejected.startswith(prompt):
                stats.first_prompt_repeated = stats.first_prompt_repeated or where
                stats.n_prompt_repeated += 1
            pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
            continue
        split = split_implicit_prompt(chosen, rejected)
        if split is None:
            raise DataError(f"{where}: no 'prompt', and chosen and rejected share no {ASSISTANT!r}")
        prompt, is_last_turn = split
        stats.n_implicit_prompt_mismatch += not is_last_turn
        pair = {"prompt": prompt, "chosen": chosen[len(prompt):], "rejected": rejected[len(prompt):]}
        # An assistant that said nothing ("\n\nAssistant: " at the end) is a real answer
        # (4 chosen ones in harmless-base test): kept; its tokens are " " and EOS.
        stats.n_empty_responses += (not pair["chosen"].strip()) + (not pair["rejected"].strip())
        pairs.append(pair)
    if not pairs:
        raise DataError(f"{path}: no pairs")
    stats.n_examples = len(pairs)
    return pairs, stats


def held_out_split(rows: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, held out): max(1, int(len(rows) * fraction)) rows held out, drawn by `seed`."""
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    n_held_out = max(1, int(len(rows) * fraction))
    return [rows[i] for i in order[n_held_out:]], [rows[i] for i in order[:n_held_out]]


# ---------------------------------------------------------------------------------
# Tokenizing


def _fit(prompt: list[int], responses: list[list[int]], max_length: int, stats: DataStats):
    """Truncate one prompt and its responses to max_length tokens (rule: module docstring)."""
    longest = max(len(r) for r in responses)
    if len(prompt) + longest > max_length:
        keep = max(max_length - longest, min(len(prompt), max_length // 2))
        if keep < len(prompt):
            prompt = prompt[len(prompt) - keep:]
            stats.n_prompt_truncated += 1
    room = max_length - len(prompt)
    stats.n_response_truncated += sum(len(r) > room for r in responses)
    return prompt, [r[:room] for r in responses]


def tokenize_sft(examples: list[dict], tokenizer, max_length: int
                 ) -> tuple[list[Example], DataStats]:
    """Token examples (prompt + completion + EOS, or a document + EOS), truncated or
    split to max_length, and the stats of what was done."""
    assert max_length >= 2, "max_length must leave room for a token and its successor"
    out, stats = [], DataStats()
    for i, ex in enumerate(examples):
        if "text" not in ex:
            response = tokenizer.encode(ex["completion"]) + [tokenizer.eos_id]
            prompt, [response] = _fit(tokenizer.encode(ex["prompt"]), [response], max_length, stats)
            out.append(Example(prompt + response, len(prompt), i))
            continue
        # A document: windows of max_length that overlap by one token, so the first
        # token of a window (not trained in it) was the last target of the one before.
        ids = tokenizer.encode(ex["text"]) + [tokenizer.eos_id]
        starts = range(0, len(ids) - 1, max_length - 1)
        stats.n_documents_split += len(starts) > 1
        out.extend(Example(ids[s:s + max_length], 0, i) for s in starts)
    stats.n_examples = len(out)
    return out, stats


def tokenize_pairs(pairs: list[dict], tokenizer, max_length: int, stats: DataStats | None = None
                   ) -> tuple[list[tuple[Example, Example]], DataStats]:
    """(chosen, rejected) token examples sharing one prompt, truncated alike; `stats`
    (from load_pairs) goes on counting.

    Each response ends with EOS, unless the pair says it was cut short (`chosen_ended`
    or `rejected_ended` false: a built-in sample that ran out of room). A pair whose
    chosen and rejected tokens are the same (after truncation) teaches nothing and is
    skipped, and counted; each Example's `source` is its pair's index."""
    stats = stats if stats is not None else DataStats()
    out = []
    for i, pair in enumerate(pairs):
        eos = {key: [tokenizer.eos_id] if pair.get(f"{key}_ended", True) else [] for key in ("chosen", "rejected")}
        chosen = tokenizer.encode(pair["chosen"]) + eos["chosen"]
        rejected = tokenizer.encode(pair["rejected"]) + eos["rejected"]
        prompt = tokenizer.encode(pair["prompt"])
        prompt, [chosen, rejected] = _fit(prompt, [chosen, rejected], max_length, stats)
        if chosen == rejected:
            stats.n_skipped_identical_pairs += 1
            continue
        out.append((Example(prompt + chosen, len(prompt), i), Example(prompt + rejected, len(prompt), i)))
    stats.n_examples = len(out)
    return out, stats


# ---------------------------------------------------------------------------------
# Collating


def collate(examples: list[Example], pad_id: int, device=None,
            length: int | None = None) -> dict[str, torch.Tensor]:
    """Right-padded batch on `device`: input_ids, attention_mask, labels, each [B, T]
    with T = `length`, or the longest example."""
    B = len(examples)
    T = length or max(len(ex.input_ids) for ex in examples)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.bool)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    for b, ex in enumerate(examples):
        n = len(ex.input_ids)
        input_ids[b, :n] = torch.tensor(ex.input_ids)
        attention_mask[b, :n] = True
        # position t predicts token t + 1; the last prompt position predicts the
        # response's first token, and the response's last token (EOS) predicts nothing
        first = max(ex.n_prompt - 1, 0)
        labels[b, first:n - 1] = input_ids[b, first + 1:n]
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    return {k: v.to(device) for k, v in batch.items()} if device is not None else batch


def collate_pairs(pairs: list[tuple[Example, Example]], pad_id: int,
                  device=None) -> dict[str, torch.Tensor]:
    """chosen_input_ids, chosen_attention_mask, chosen_labels and the same for rejected_,
    all [B, T] with one T, so torch.cat of chosen and rejected makes one [2B, T] batch."""
    T = max(len(ex.input_ids) for pair in pairs for ex in pair)
    chosen = collate([c for c, _ in pairs], pad_id, device, length=T)
    rejected = collate([r for _, r in pairs], pad_id, device, length=T)
    return {**{f"chosen_{k}": v for k, v in chosen.items()},
            **{f"rejected_{k}": v for k, v in rejected.items()}}


def collate_prompts(prompts: list[list[int]], pad_id: int, device=None) -> dict[str, torch.Tensor]:
    """Left-padded prompt token ids for generation: input_ids and attention_mask, [B, P].

    Every row ends at position P - 1, so sampled tokens are appended to all rows at
    once; the model counts positions over real tokens only, so padding shifts nothing."""
    B, P = len(prompts), max(len(p) for p in prompts)
    input_ids = torch.full((B, P), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, P), dtype=torch.bool)
    for b, ids in enumerate(prompts):
        input_ids[b, P - len(ids):] = torch.tensor(ids, dtype=torch.long)
        attention_mask[b, P - len(ids):] = True
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    return {k: v.to(device) for k, v in batch.items()} if device is not None else batch

