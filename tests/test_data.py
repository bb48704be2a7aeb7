import gzip
import json
import re

import pytest
import torch

from minalign.data import (
    ASSISTANT, IGNORE_INDEX, DataError, DataStats, Example, collate, collate_pairs,
    collate_prompts, data_name, load_pairs, load_sft, tokenize_pairs, tokenize_sft,
)
from minalign.tokenizer import get_tokenizer

tok = get_tokenizer("builtin")


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# ---- reading ----------------------------------------------------------------------


def test_load_sft_formats(tmp_path):
    txt = tmp_path / "docs.txt"
    txt.write_text("first doc\nstill first\n\n\n  \nsecond doc\n")
    assert load_sft(txt) == [{"text": "first doc\nstill first"}, {"text": "second doc"}]

    records = [{"text": "a doc"}, {"prompt": "Q:", "completion": " A"}]
    jsonl = write_jsonl(tmp_path / "sft.jsonl", records)
    assert load_sft(jsonl) == records

    gz = tmp_path / "sft.jsonl.gz"
    gz.write_bytes(gzip.compress(jsonl.read_bytes()))
    assert load_sft(gz) == records


def test_load_pairs_explicit_and_implicit(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": "Say hi.", "chosen": " Hi!", "rejected": " No."},
        {"chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: bye\n\nAssistant: Bye!",
         "rejected": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: bye\n\nAssistant: Whatever."},
    ])
    pairs, stats = load_pairs(path)
    assert pairs[0] == {"prompt": "Say hi.", "chosen": " Hi!", "rejected": " No."}
    assert pairs[1] == {"prompt": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: bye\n\nAssistant:",
                        "chosen": " Bye!", "rejected": " Whatever."}
    assert stats.n_implicit_prompt_mismatch == 0


def test_sft_examples_given_as_pairs_are_named(tmp_path):
    for row in ({"text": "A review."}, {"prompt": "Say hi.", "completion": " Hi!"}):
        path = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "p", "chosen": " a", "rejected": " b"}, row])
        with pytest.raises(DataError, match=r"sft.jsonl:2: an SFT example .*, for train_sft.py; preference pairs take"):
            load_pairs(path)


def test_responses_that_repeat_their_prompt_are_counted_and_noted(tmp_path):
    from minalign.data import repeated_prompt_note

    whole = {"prompt": "Say hi.", "chosen": "Say hi. Hi!", "rejected": "Say hi. No."}
    path = write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": "Say hi.", "chosen": " Hi!", "rejected": "Say hi. No."},  # one alone is a response
        whole, whole])
    pairs, stats = load_pairs(path)
    assert pairs[1] == whole, "kept as they are"
    assert stats.n_prompt_repeated == 2 and str(stats) == "3 kept; 2 pairs whose chosen and rejected begin with the prompt"
    assert repeated_prompt_note(stats).startswith(f"note: 2 pairs (the first at {path}:2) begin both chosen and "
                                                  f"rejected with the 'prompt'")
    assert repeated_prompt_note(load_pairs(write_jsonl(tmp_path / "ok.jsonl", [pairs[0]]))[1]) is None


def test_blank_lines_of_a_pairs_file_are_skipped_and_counted(tmp_path):
    row = json.dumps({"prompt": "Say hi.", "chosen": " Hi!", "rejected": " No."})
    path = tmp_path / "pairs.jsonl"
    path.write_text(f"{row}\n\n{row}\n  \n{row}\n")
    pairs, stats = load_pairs(path)
    assert len(pairs) == 3 and stats.n_blank_lines == 2
    assert str(stats) == "3 kept; 2 blank lines skipped"


def test_implicit_prompt_mismatch_is_split_at_last_shared_turn(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [
        {"chosen": "\n\nHuman: q\n\nAssistant: a\n\nAssistant: b",
         "rejected": "\n\nHuman: q\n\nAssistant: c"},
    ])
    [pair], stats = load_pairs(path)
    assert pair == {"prompt": "\n\nHuman: q\n\nAssistant:",
                    "chosen": " a\n\nAssistant: b", "rejected": " c"}
    assert stats.n_implicit_prompt_mismatch == 1


BAD_LINES = [
    ('{"prompt": "p", "chosen": "c", "rejected": "r"', r"malformed JSON \(Expecting ',' delimiter, column 47\)"),
    ('{"prompt": "p", "chosen": "c"}', "missing key 'rejected'"),
    ('{"prompt": "p", "chosen": "c", "rejected": 3}', "'rejected' must be a string, got int"),
    ('{"prompt": "", "chosen": "c", "rejected": "r"}', "'prompt' is empty"),
    ('["p", "c", "r"]', "expected a JSON object"),
    ('{"chosen": "Human: a", "rejected": "Human: b"}', "share no"),
]


@pytest.mark.parametrize("line,message", BAD_LINES)
def test_bad_pair_names_file_and_line(tmp_path, line, message):
    path = tmp_path / "pairs.jsonl"
    good = '{"prompt": "p", "chosen": "c", "rejected": "r"}'
    path.write_text(f"{good}\n\n{good}\n{line}\n{good}\n")
    with pytest.raises(DataError, match=f"pairs.jsonl:4: .*{message}"):
        load_pairs(path)


def test_non_utf8_names_file_and_line(tmp_path):
    path = tmp_path / "docs.txt"
    path.write_bytes(b"fine\n\nalso fine\nbroken \xff byte\n")
    with pytest.raises(DataError, match=r"docs.txt:4: not UTF-8 \(byte 0xff\)"):
        load_sft(path)
    gz = tmp_path / "sft.jsonl.gz"
    gz.write_bytes(gzip.compress(b'{"text": "ok"}\n{"text": "\xc3"}\n'))
    with pytest.raises(DataError, match="sft.jsonl.gz:2: not UTF-8"):
        load_sft(gz)


def test_truncated_gzip(tmp_path):
    path = tmp_path / "sft.jsonl.gz"
    path.write_bytes(gzip.compress(b'{"text": "ok"}\n' * 100)[:-12])  # the end cut off
    with pytest.raises(DataError, match="sft.jsonl.gz:.*bad gzip data"):
        load_sft(path)


def test_bad_sft_records(tmp_path):
    path = write_jsonl(tmp_path / "sft.jsonl", [{"text": "ok"}, {"prompt": "p"}])
    with pytest.raises(DataError, match="sft.jsonl:2: missing key 'completion'"):
        load_sft(path)
    path = write_jsonl(tmp_path / "sft.jsonl", [{"text": "  "}])
    with pytest.raises(DataError, match="sft.jsonl:1: 'text' is empty"):
        load_sft(path)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match="no examples"):
        load_sft(empty)
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="data.csv: unknown format"):
        load_sft(tmp_path / "data.csv")
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "p", "chosen": " a", "rejected": " b"}])
    with pytest.raises(DataError, match="pairs.jsonl:1: a preference pair .*, for train_rm.py and train_dpo.py; SFT"):
        load_sft(path)


# ---- tokenizing and collating -------------------------------------------------------


def test_collate_masks_and_shift():
    examples = [Example([10, 11, 12, 13, tok.eos_id], n_prompt=2),
                Example([20, 21, tok.eos_id], n_prompt=1)]
    batch = collate(examples, tok.pad_id)
    P, E, X = tok.pad_id, tok.eos_id, IGNORE_INDEX
    assert batch["input_ids"].tolist() == [[10, 11, 12, 13, E], [20, 21, E, P, P]]
    assert batch["attention_mask"].tolist() == [[True] * 5, [True] * 3 + [False] * 2]
    # prompt [10, 11]: position 1 predicts the first response token 12; EOS is a target
    assert batch["labels"].tolist() == [[X, 12, 13, E, X], [21, E, X, X, X]]
    assert batch["input_ids"].dtype == batch["labels"].dtype == torch.int64
    assert batch["attention_mask"].dtype == torch.bool
    on_device = collate(examples, tok.pad_id, device="cpu")
    assert all(torch.equal(on_device[k], batch[k]) for k in batch)


def test_tokenize_sft_prompt_completion():
    [ex], _ = tokenize_sft([{"prompt": "The plot", "completion": " was good."}], tok, max_length=64)
    prompt, response = tok.encode("The plot"), tok.encode(" was good.")
    assert ex == Example(prompt + response + [tok.eos_id], len(prompt), source=0)
    labels = collate([ex], tok.pad_id)["labels"][0]
    trained = labels[labels != IGNORE_INDEX].tolist()
    assert trained == response + [tok.eos_id]


def test_long_document_is_split_into_windows():
    text = " good" * 25
    ids = tok.encode(text) + [tok.eos_id]
    assert len(ids) == 26
    windows, stats = tokenize_sft([{"text": text}], tok, max_length=10)
    assert [len(w.input_ids) for w in windows] == [10, 10, 8]
    assert all(w.n_prompt == 0 for w in windows)
    # every token but the first is a target exactly once
    labels = collate(windows, tok.pad_id)["labels"]
    targets = [t for row in labels.tolist() for t in row if t != IGNORE_INDEX]
    assert targets == ids[1:]
    assert stats.n_documents_split == 1 and stats.n_examples == 3


def test_truncation_rule_and_counts():
    prompt, response = " bad" * 30, " good" * 5  # 30 and 5 (+EOS) tokens
    [ex], stats = tokenize_sft([{"prompt": prompt, "completion": response}], tok, max_length=20)
    # the prompt loses its start, the whole response and its EOS stay
    assert len(ex.input_ids) == 20 and ex.n_prompt == 14 and ex.input_ids[-1] == tok.eos_id
    assert ex.input_ids[:14] == tok.encode(prompt)[-14:]
    assert (stats.n_prompt_truncated, stats.n_response_truncated) == (1, 0)

    long_response = " good" * 40
    [ex], stats = tokenize_sft([{"prompt": prompt, "completion": long_response}], tok, max_length=20)
    # the prompt keeps half, the response is cut and has no EOS
    assert ex.n_prompt == 10 and len(ex.input_ids) == 20 and tok.eos_id not in ex.input_ids
    assert (stats.n_prompt_truncated, stats.n_response_truncated) == (1, 1)
    assert str(stats) == "1 kept; 1 prompt truncated, 1 response truncated"  # what the scripts print
    assert str(DataStats(n_examples=1234)) == "1,234 kept"
    assert str(DataStats(n_examples=9, n_prompt_truncated=2, n_empty_responses=3)) == \
        "9 kept; 2 prompts truncated, 3 empty responses"


def test_pairs_tokenize_collate_and_skip_identical():
    pairs = [{"prompt": "I", "chosen": " liked it.", "rejected": " liked it."},
             {"prompt": "The plot", "chosen": " was good.", "rejected": " was bad and slow."}]
    tokenized, stats = tokenize_pairs(pairs, tok, max_length=64)
    assert len(tokenized) == 1 and stats.n_skipped_identical_pairs == 1 and stats.n_examples == 1
    assert tokenized[0][0].source == tokenized[0][1].source == 1  # what the pair was made from
    batch = collate_pairs(tokenized, tok.pad_id)
    assert set(batch) == {f"{side}_{key}" for side in ("chosen", "rejected")
                          for key in ("input_ids", "attention_mask", "labels")}
    assert batch["chosen_input_ids"].shape == batch["rejected_input_ids"].shape
    n_prompt = len(tok.encode("The plot"))
    assert (batch["chosen_labels"][:, :n_prompt - 1] == IGNORE_INDEX).all()
    assert tok.decode(batch["chosen_input_ids"][0]) == "The plot was good.<|endoftext|>"
    assert tok.decode(batch["rejected_input_ids"][0]) == "The plot was bad and slow.<|endoftext|>"


def test_collate_prompts_left_pads():
    batch = collate_prompts([[1, 2, 3], [4]], pad_id=tok.pad_id)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [tok.pad_id, tok.pad_id, 4]]
    assert batch["attention_mask"].tolist() == [[True, True, True], [False, False, True]]



# ---- real data ---------------------------------------------------------------------


def test_hh_rlhf_harmless_base(shared_data):
    pairs, stats = load_pairs(shared_data / "hh-rlhf" / "harmless-base-test.jsonl.gz")
    assert len(pairs) == 2312
    assert all(p["prompt"].endswith(ASSISTANT) and p["prompt"].startswith("\n\nHuman:") for p in pairs)
    # 5 pairs go on for more turns on one side (4 of them where the rejected text does
    # not even start with the chosen text up to its last turn): split at the shared turn
    assert stats.n_implicit_prompt_mismatch == 5
    assert stats.n_empty_responses == 4 == sum(p["chosen"] == " " for p in pairs)
    odd = [p for p in pairs if ASSISTANT in p["chosen"] or ASSISTANT in p["rejected"]]
    assert len(odd) == 5 and sum(ASSISTANT in p["chosen"] for p in odd) == 4
    tokenized, stats = tokenize_pairs(pairs[:200], get_tokenizer("gpt2"), max_length=128, stats=stats)
    assert len(tokenized) + stats.n_skipped_identical_pairs == 200
    assert all(len(c.input_ids) <= 128 and len(r.input_ids) <= 128 for c, r in tokenized)
    assert stats.n_prompt_truncated > 0
    assert stats.n_implicit_prompt_mismatch == 5 and stats.n_examples == len(tokenized)


def test_a_folder_given_as_data_is_named(tmp_path):
    (tmp_path / "pairs.jsonl").mkdir()
    with pytest.raises(DataError, match=r"pairs.jsonl: a folder, not a data file"):
        load_pairs(tmp_path / "pairs.jsonl")


def test_a_folder_or_missing_file_is_named_whatever_its_suffix(tmp_path):
    (tmp_path / "corpus").mkdir()
    with pytest.raises(DataError, match=r"corpus: a folder, not a data file$"):
        load_sft(tmp_path / "corpus")
    with pytest.raises(DataError, match=r"nowhere: no such file$"):
        load_pairs(tmp_path / "nowhere")


def test_suffixes_are_read_in_any_case(tmp_path):
    (tmp_path / "Docs.TXT").write_text("one\n\ntwo\n")
    assert load_sft(tmp_path / "Docs.TXT") == [{"text": "one"}, {"text": "two"}]
    with gzip.open(tmp_path / "PAIRS.JSONL.GZ", "wt") as f:
        f.write(json.dumps({"prompt": "p", "chosen": " a", "rejected": " b"}) + "\n")
    assert load_pairs(tmp_path / "PAIRS.JSONL.GZ")[0] == [{"prompt": "p", "chosen": " a", "rejected": " b"}]
    assert data_name("a/HH.Test.JSONL.GZ") == "HH.Test"


def test_a_missing_data_file_is_named(tmp_path):
    with pytest.raises(DataError, match=r"^.*nowhere.jsonl: no such file$"):
        load_sft(tmp_path / "nowhere.jsonl")


def test_damaged_records_and_caches_are_named(tmp_path):
    from minalign.data import read_record, read_rows

    (tmp_path / "meta.json").write_text('{"settings": {"seed": 1}}')
    assert read_record(tmp_path / "meta.json") == {"settings": {"seed": 1}}
    for text, why in (('{"settings": {"se', "damaged .*Unterminated string"), ("[]", "damaged .not a JSON object")):
        (tmp_path / "meta.json").write_text(text)
        with pytest.raises(DataError, match=rf"meta.json: {why}.*: remove it, or its folder, to make it again"):
            read_record(tmp_path / "meta.json")
    (tmp_path / "train.jsonl").write_text('{"prompt": "a"}\n{"prompt": "b", "cho')  # cut short
    with pytest.raises(DataError, match=r"train.jsonl:2: damaged"):
        read_rows(tmp_path / "train.jsonl")
    fields = {"prompt": str, "chosen": str, "gold": (int, float)}
    good = {"prompt": "p", "chosen": "c", "gold": 0.5, "note": None}
    (tmp_path / "train.jsonl").write_text(json.dumps(good) + "\n" + json.dumps({**good, "gold": -1}) + "\n")
    assert read_rows(tmp_path / "train.jsonl", fields) == [good, {**good, "gold": -1}]
    for row, why in ((["p", "c", 0.5], "not a JSON object"), ({"prompt": "p", "gold": 1.0}, "'chosen' missing"),
                     ({**good, "prompt": 3, "gold": "high"}, "'prompt', 'gold' missing"), ({**good, "gold": True}, "'gold'")):
        (tmp_path / "train.jsonl").write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
        with pytest.raises(DataError, match=rf"train.jsonl:2: damaged \({why}.*\): remove the file's folder"):
            read_rows(tmp_path / "train.jsonl", fields)


def test_tiny_shakespeare_documents_and_windows(shared_data):
    path = shared_data / "text" / "tinyshakespeare.txt"
    text = path.read_text()
    docs = load_sft(path)
    # one document per speech, nothing dropped or changed
    assert [d["text"] for d in docs] == re.split(r"\n\n+", text.strip("\n"))
    assert len(docs) == 7222
    gpt2 = get_tokenizer("gpt2")
    examples, stats = tokenize_sft(docs[:400], gpt2, max_length=32)
    assert stats.n_documents_split > 100
    for i, doc in enumerate(docs[:400]):
        windows = [e.input_ids for e in examples if e.source == i]
        assert all(len(w) <= 32 for w in windows)
        # consecutive windows share one token; together they are the whole document
        assert windows[0] + sum((w[1:] for w in windows[1:]), []) == gpt2.encode(doc["text"]) + [gpt2.eos_id]


def test_empty_responses_byte_order_marks_and_ambiguous_records(tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('\ufeff{"prompt": "The plot", "chosen": " was good.", "rejected": ""}\n', encoding="utf-8")
    loaded, stats = load_pairs(pairs)  # the mark is not text; an empty response is EOS alone
    assert loaded == [{"prompt": "The plot", "chosen": " was good.", "rejected": ""}]
    assert stats.n_empty_responses == 1
    sft = tmp_path / "sft.jsonl"
    sft.write_text('{"text": "a", "prompt": "b", "completion": "c"}\n')
    with pytest.raises(DataError, match=r"sft.jsonl:1: expected either 'text', or 'prompt' and 'completion' \(not both\)"):
        load_sft(sft)
    sft.write_text('{"body": "a"}\n')
    with pytest.raises(DataError, match=r"sft.jsonl:1: expected either 'text', or 'prompt' and 'completion'$"):
        load_sft(sft)
    sft.write_text('[{"text": "a"},\n {"text": "b"}]\n')
    with pytest.raises(DataError, match="expected one JSON object per line"):
        load_sft(sft)


def test_pairs_are_truncated_by_their_longer_response():
    # the prompt keeps its end, at least half the budget; the responses share the rest
    prompt = " ".join(f"w{i}" for i in range(40))
    raw = [{"prompt": prompt, "chosen": " good.", "rejected": " bad" * 30}]
    [(chosen, rejected)], stats = tokenize_pairs(raw, tok, max_length=24)
    assert chosen.n_prompt == rejected.n_prompt == 12  # max(24 - longest, 24 // 2)
    assert chosen.input_ids[:12] == tok.encode(prompt)[-12:]
    assert chosen.input_ids[12:] == tok.encode(" good.") + [tok.eos_id]  # short enough to keep whole
    assert len(rejected.input_ids) == 24 and tok.eos_id not in rejected.input_ids
    assert (stats.n_prompt_truncated, stats.n_response_truncated) == (1, 1)
