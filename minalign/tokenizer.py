"""Tokenizers: GPT-2's BPE, or a small BPE trained on the built-in task's reviews.

Both are byte-level BPE run by tiktoken, with two special tokens:

- EOS "<|endoftext|>" ends every response; the model learns to emit it to stop.
- PAD "<|pad|>" fills batches to one length. It is a token of its own, never EOS, so
  masking padding can never mask a real end of text.

`encode` treats text as data: "<|endoftext|>" written inside a review or a chat log
is encoded as the ordinary characters it is made of, never as the special token
(tiktoken's `encode_ordinary`), so user data cannot end a sequence early, and
`decode(encode(text)) == text` for every valid Unicode string.

"builtin" is trained by `python -m minalign.tokenizer` on the train reviews of
`minalign.task` and shipped as `assets/builtin.tiktoken` (one "base64(token) rank"
line per token, the format of tiktoken's own files). The trainer below is plain
byte-level BPE (Sennrich et al. 2016; Radford et al. 2019): start from the 256 bytes,
repeatedly merge the most frequent adjacent pair, never across GPT-2's pre-tokenizer
split (so merges stay inside words). Training is deterministic: ties go to the
smallest pair.

Size, by measurement: the corpus is made of 308 distinct pre-tokens (words with
their leading space, punctuation). Merging until each is a single token gives 1,126
tokens (256 bytes + 870 merges; 1,128 ids with EOS and PAD), and that is the builtin
vocabulary. Tokens per val review (`--report`): 87.9 bytes, 32.7 at 512 tokens, 23.1
at 768, 18.7 at 1,126 (GPT-2: 18.9). A 2-layer, 96-wide GPT trained for 60 s on one
CPU thread (context 96 tokens for bytes, 48 otherwise) reached 0.513, 0.318, 0.297
and 0.288 nats per character of val text with 256, 512, 768 and 1,126 tokens, and
82%, 99.1%, 99.2% and 100% of the words in its samples were words of the corpus:
smaller vocabularies spend a tiny model's capacity and context on spelling. Nothing
is left to merge past 1,126, so no larger size exists for this corpus.
"""

import base64
import functools
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import regex
import tiktoken

from minalign.cli import ArgumentError, check_args, given, parse_args

EOS = "<|endoftext|>"
PAD = "<|pad|>"
# GPT-2's pre-tokenizer: contractions, words with their leading space, numbers,
# punctuation runs, whitespace. BPE merges never cross these pieces.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
BUILTIN_FILE = Path(__file__).parent / "assets" / "builtin.tiktoken"


class Tokenizer:
    """A tiktoken encoding plus the two special tokens minalign needs."""

    def __init__(self, name: str, encoding: tiktoken.Encoding):
        self.name = name
        self.encoding = encoding
        self.eos_id = encoding.encode_single_token(EOS)
        self.pad_id = encoding.encode_single_token(PAD)
        self.vocab_size = encoding.n_vocab  # all ids, specials included

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; no special token is added, nor read out of the text."""
        return self.encoding.encode_ordinary(text)

    def decode(self, ids) -> str:
        """Text of a list or 1-D tensor of ids. PAD is skipped; EOS reads "<|endoftext|>"."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return self.encoding.decode([i for i in ids if i != self.pad_id])

    def __repr__(self) -> str:
        return (f"Tokenizer({self.name!r}, vocab_size={self.vocab_size}, "
                f"eos_id={self.eos_id}, pad_id={self.pad_id})")


def read_ranks(path: Path) -> dict[bytes, int]:
    """Read a .tiktoken file: one "base64(token) rank" line per token."""
    ranks = {}
    for line in path.read_text().splitlines():
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
    return ranks


def write_ranks(ranks: dict[bytes, int], path: Path) -> None:
    by_rank = sorted(ranks.items(), key=lambda item: item[1])
    path.write_text("".join(f"{base64.b64encode(token).decode()} {rank}\n" for token, rank in by_rank))


TOKENIZERS = ("builtin", "gpt2")


@functools.lru_cache(maxsize=None)
def get_tokenizer(name: str = "builtin") -> Tokenizer:
    """"builtin" (the task's own small BPE, no download) or "gpt2" (50,257 + PAD)."""
    if name == "builtin":
        ranks = read_ranks(BUILTIN_FILE)
        specials = {EOS: len(ranks), PAD: len(ranks) + 1}
        encoding = tiktoken.Encoding("minalign-builtin", pat_str=GPT2_PATTERN,
                                     mergeable_ranks=ranks, special_tokens=specials)
    elif name == "gpt2":
        # Needs GPT-2's BPE file: downloaded once by tiktoken, or found in TIKTOKEN_CACHE_DIR.
        try:
            gpt2 = tiktoken.get_encoding("gpt2")
        except OSError as error:  # requests' connection errors are OSErrors too
            cache = os.environ.get("TIKTOKEN_CACHE_DIR")
            where = f"TIKTOKEN_CACHE_DIR={cache} does not hold them" if cache else "TIKTOKEN_CACHE_DIR is not set"
            raise ArgumentError(f"--tokenizer gpt2: GPT-2's BPE files could not be downloaded "
                                f"({type(error).__name__}) and {where}: set it to a folder holding them (this "
                                f"project's data folder has one: ../shared/data/tiktoken)") from None
        specials = {EOS: gpt2.eot_token, PAD: gpt2.n_vocab}  # EOS 50256, PAD 50257
        encoding = tiktoken.Encoding("minalign-gpt2", pat_str=gpt2._pat_str,
                                     mergeable_ranks=gpt2._mergeable_ranks, special_tokens=specials)
    else:
        raise ValueError(f"unknown tokenizer {name!r}: choose 'builtin' or 'gpt2'")
    return Tokenizer(name, encoding)


def data_note(args) -> str | None:
    """A line for a --data run on the built-in tokenizer by default, not by choice."""
    if args.data is not None and args.tokenizer == "builtin" and "tokenizer" not in given(args):
        return ("note: --tokenizer builtin, the default, was made for the built-in task's reviews: other text takes "
                "more of its tokens (HH-RLHF about twice as many as with --tokenizer gpt2)")
    return None


# ---------------------------------------------------------------------------------
# The BPE trainer that made assets/builtin.tiktoken


def train_bpe(texts: list[str], vocab_size: int | None = None) -> dict[bytes, int]:
    """Byte-level BPE: the 256 bytes, then merges of the most frequent adjacent pair
    until `vocab_size` tokens, or (None) until every pre-token is a single token.
    Returns tiktoken's mergeable ranks: token bytes -> rank, in the order learnt."""
    word_counts = Counter(w for text in texts for w in regex.findall(GPT2_PATTERN, text))
    words = {w.encode(): [bytes([b]) for b in w.encode()] for w in word_counts}  # -> its tokens
    counts = {w.encode(): n for w, n in word_counts.items()}
    ranks = {bytes([b]): b for b in range(256)}
    while vocab_size is None or len(ranks) < vocab_size:
        pairs = Counter()
        for word, parts in words.items():
            for pair in zip(parts, parts[1:]):
                pairs[pair] += counts[word]
        if not pairs:
            break  # every word is a single token
        a, b = min(pairs, key=lambda pair: (-pairs[pair], pair))  # most frequent, ties: smallest
        if a + b not in ranks:
            ranks[a + b] = len(ranks)
        for word, parts in words.items():  # apply the merge everywhere, left to right
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and parts[i] == a and parts[i + 1] == b:
                    merged.append(a + b)
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            words[word] = merged
    return ranks


@dataclass
class Args:
    """Train the builtin tokenizer on the task's train reviews (python -m minalign.tokenizer)."""

    vocab_size: int | None = None
    """Tokens to learn (None: merge until every word is one token)."""
    out: str = str(BUILTIN_FILE)
    """Where the ranks go."""
    report: bool = False
    """Also print tokens per val review for a few sizes."""

    def __post_init__(self):
        check_args(self, positive=("vocab_size",))


def main():
    from minalign import task

    args = parse_args(Args)

    train, val = task.reviews("train"), task.reviews("val")
    if args.report:
        for size in (256, 512, 768, None):
            ranks = train_bpe(train, size)
            enc = tiktoken.Encoding("report", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={})
            n_tokens = sum(len(enc.encode_ordinary(review)) for review in val)
            print(f"{len(ranks)} tokens: {n_tokens / len(val):.1f} tokens per val review")
    ranks = train_bpe(train, args.vocab_size)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_ranks(ranks, Path(args.out))
    print(f"wrote {len(ranks)} tokens (+ {EOS}, {PAD}) to {args.out}")


if __name__ == "__main__":
    main()
