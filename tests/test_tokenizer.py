import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minalign import task
from minalign.tokenizer import BUILTIN_FILE, EOS, PAD, get_tokenizer, read_ranks, train_bpe

TEXTS = [
    "The acting was surprisingly good, but the plot felt slow. I would watch it again.",
    "Ünïcödé: naïve café, 東京, emoji 🎬🍿, tabs\tand\nnewlines\r\n  and trailing spaces  ",
    "user data that mentions <|endoftext|> and <|pad|> as plain text",
    "",
    " ",
]


@pytest.fixture(params=["builtin", "gpt2"])
def tok(request):
    return get_tokenizer(request.param)


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_round_trip_any_text(text):
    for name in ("builtin", "gpt2"):
        tok = get_tokenizer(name)
        assert tok.decode(tok.encode(text)) == text


def test_special_token_text_in_data_stays_text(tok):
    ids = tok.encode(f"a {EOS} b {PAD} c")
    assert tok.eos_id not in ids and tok.pad_id not in ids
    assert tok.decode(ids) == f"a {EOS} b {PAD} c"


def test_special_ids(tok):
    assert tok.eos_id != tok.pad_id
    assert max(tok.eos_id, tok.pad_id) < tok.vocab_size
    # decode skips PAD, keeps EOS, accepts a tensor
    ids = tok.encode("Hello") + [tok.eos_id, tok.pad_id, tok.pad_id]
    assert tok.decode(torch.tensor(ids)) == "Hello" + EOS


def test_gpt2_ids():
    tok = get_tokenizer("gpt2")
    assert tok.encode("Hello world") == [15496, 995]
    assert (tok.eos_id, tok.pad_id, tok.vocab_size) == (50256, 50257, 50258)


def test_builtin_ids():
    tok = get_tokenizer("builtin")
    assert (tok.eos_id, tok.pad_id, tok.vocab_size) == (1126, 1127, 1128)
    # every byte is a token, so any text encodes; the task's words are single tokens
    assert all(bytes([b]) in tok.encoding._mergeable_ranks for b in range(256))
    assert all(len(tok.encode(w)) == 1 for w in [" somewhat", " cinematography", ".", ","])


def test_unknown_tokenizer():
    with pytest.raises(ValueError, match="builtin.*gpt2"):
        get_tokenizer("llama")


def test_shipped_builtin_file_is_what_the_trainer_makes():
    assert read_ranks(BUILTIN_FILE) == train_bpe(task.reviews("train"))


def test_train_bpe_small():
    ranks = train_bpe(["low lower lowest", "low low"], 260)
    assert len(ranks) == 260
    assert list(ranks.values()) == list(range(260))
    # " low" is by far the most frequent word: its pieces are merged first
    assert ranks[b"lo"] == 256 and b" low" in ranks


def test_gpt2_offline_without_its_files_is_one_clear_line(monkeypatch):
    import tiktoken

    from minalign.cli import ArgumentError

    def offline(name):
        raise ConnectionError("no route to host")  # what requests raises is an OSError too

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    monkeypatch.delenv("TIKTOKEN_CACHE_DIR", raising=False)
    get_tokenizer.cache_clear()
    try:
        with pytest.raises(ArgumentError, match=r"^--tokenizer gpt2: GPT-2's BPE files could not be downloaded "
                                                r"\(ConnectionError\) and TIKTOKEN_CACHE_DIR is not set: set it to a "
                                                r"folder holding them"):
            get_tokenizer("gpt2")
        monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "/nowhere")
        with pytest.raises(ArgumentError, match="TIKTOKEN_CACHE_DIR=/nowhere does not hold them"):
            get_tokenizer("gpt2")
    finally:
        get_tokenizer.cache_clear()  # the other tests get the real tokenizer again


def test_a_data_run_left_on_the_builtin_tokenizer_by_default_gets_a_note():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import train_sft

    from minalign.cli import parse_args
    from minalign.tokenizer import data_note

    assert data_note(parse_args(train_sft.Args, ["--data", "x.jsonl"])).startswith("note: --tokenizer builtin")
    assert data_note(parse_args(train_sft.Args, ["--data", "x.jsonl", "--tokenizer", "builtin"])) is None
    assert data_note(parse_args(train_sft.Args, [])) is None
