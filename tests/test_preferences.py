import random

import pytest
import torch

from minalign.data import DataError
from minalign.model import GPT, GPTConfig
from minalign.preferences import bayes_optimal_accuracy, label_pairs, make_pairs
from minalign.tokenizer import get_tokenizer


def test_ranked_labels_take_all_pairs_and_drop_ties():
    pairs, ties = label_pairs("p", ["a", "b", "c", "d"], [0.5, -0.2, 0.5, 0.9], random.Random(0))
    assert ties == 1 and len(pairs) == 5
    for p in pairs:
        assert p["chosen_gold"] > p["rejected_gold"] and p["p_chosen"] == 1.0
    assert bayes_optimal_accuracy(pairs) == 1.0


def test_noisy_labels_follow_bradley_terry():
    rng = random.Random(0)
    n_right, n = 0, 4000
    for _ in range(n):
        (pair,), _ = label_pairs("p", ["good", "bad"], [0.6, 0.4], rng, label_temperature=0.2)
        n_right += pair["chosen"] == "good"
    p = 1 / (1 + torch.exp(torch.tensor(-1.0))).item()  # sigmoid(0.2 / 0.2)
    assert n_right / n == pytest.approx(p, abs=0.025)
    pairs = [label_pairs("p", ["good", "bad"], [0.6, 0.4], rng, 0.2)[0][0] for _ in range(50)]
    assert bayes_optimal_accuracy(pairs) == pytest.approx(p)


def test_pair_generation_is_deterministic_by_seed():
    tok = get_tokenizer("builtin")
    torch.manual_seed(0)
    policy = GPT(GPTConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=32, block_size=32))
    prompts = ["The acting was", "I saw it on a", "This film"]
    a, stats = make_pairs(policy, tok, prompts, max_new_tokens=12, seed=5)
    b, _ = make_pairs(policy, tok, prompts, max_new_tokens=12, seed=5)
    c, _ = make_pairs(policy, tok, prompts, max_new_tokens=12, seed=6)
    assert a == b and a != c
    assert stats["pairs"] + stats["ties_dropped"] == 3 * 6
    assert all(p["prompt"] in prompts for p in a)


def test_cached_pairs_are_reused_only_for_the_policy_that_made_them(tmp_path, capsys):
    from minalign.preferences import builtin_pairs

    tok = get_tokenizer("builtin")
    policies = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        policies.append(GPT(GPTConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=32, block_size=32)))
    settings = dict(tokenizer=tok, n_train_prompts=4, n_test_prompts=2, label_temperature=None, max_new_tokens=8,
                    seed=3)
    first = builtin_pairs(tmp_path, policies[0], **settings)
    assert "sampling" in capsys.readouterr().out
    assert builtin_pairs(tmp_path, policies[0], **settings) == first
    assert "reusing" in capsys.readouterr().out
    other = builtin_pairs(tmp_path, policies[1], **settings)  # another SFT policy: new pairs
    assert "sampling" in capsys.readouterr().out and other != first
    lines = (tmp_path / "train.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "train.jsonl").write_text("".join(lines[:-1]))  # cut short at a line's end: still JSON
    with pytest.raises(DataError, match=rf"train.jsonl: {len(lines) - 1} pairs where .*meta.json counts {len(lines)}"):
        builtin_pairs(tmp_path, policies[1], **settings)


def test_tiny_label_temperatures_do_not_overflow():
    (pair,), _ = label_pairs("p", ["a", "b"], [-0.9, 0.9], random.Random(0), label_temperature=1e-4)
    assert pair["chosen"] == "b" and pair["p_chosen"] == 1.0


def test_an_interrupted_regeneration_leaves_no_matching_cache(tmp_path, monkeypatch):
    import json

    from minalign import preferences

    tok = get_tokenizer("builtin")
    torch.manual_seed(0)
    policy = GPT(GPTConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=32, block_size=32))
    settings = dict(tokenizer=tok, n_test_prompts=2, label_temperature=None, max_new_tokens=8, seed=3)
    preferences.builtin_pairs(tmp_path, policy, n_train_prompts=4, **settings)
    old_meta = json.loads((tmp_path / "meta.json").read_text())
    real = preferences.make_pairs

    def fail_on_test(policy, tokenizer, prompts, *args, **kwargs):
        if len(prompts) == 2:  # the test split: die after train.jsonl was rewritten
            raise KeyboardInterrupt
        return real(policy, tokenizer, prompts, *args, **kwargs)
    monkeypatch.setattr(preferences, "make_pairs", fail_on_test)
    with pytest.raises(KeyboardInterrupt):
        preferences.builtin_pairs(tmp_path, policy, n_train_prompts=5, **settings)
    assert not (tmp_path / "meta.json").exists()  # the first settings no longer match a half-new cache
    assert old_meta["settings"]["n_train_prompts"] == 4


def test_each_pair_is_made_of_its_own_prompts_completions(monkeypatch):
    from minalign import preferences

    def fake_sample_completions(policy, tokenizer, prompts, max_new_tokens, batch_size, seed=0, **kw):
        texts = [f" <{p}> #{seed + i}" for i, p in enumerate(prompts)]  # each completion names its prompt
        return texts, [True] * len(texts)
    monkeypatch.setattr(preferences, "sample_completions", fake_sample_completions)
    monkeypatch.setattr(preferences.task, "gold_reward", lambda texts: [float(len(t) % 7) + 0.01 * i
                                                                          for i, t in enumerate(texts)])
    prompts = ["The acting was", "I saw it on a", "This film"]
    pairs, stats = make_pairs(None, None, prompts, n_samples=4, max_new_tokens=8, seed=5)
    assert stats["pairs"] + stats["ties_dropped"] == 3 * 6
    for pair in pairs:
        assert f"<{pair['prompt']}>" in pair["chosen"] and f"<{pair['prompt']}>" in pair["rejected"]
        assert pair["chosen_gold"] > pair["rejected_gold"]


def test_a_completion_cut_short_is_trained_without_an_eos():
    from minalign import data

    tok = get_tokenizer("builtin")
    torch.manual_seed(0)
    policy = GPT(GPTConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=32, block_size=32))
    prompts = ["The acting was", "I saw it on a", "This film"]
    pairs, _ = make_pairs(policy, tok, prompts, max_new_tokens=3, seed=5)  # an untrained policy rarely ends
    assert not any(pair["chosen_ended"] or pair["rejected_ended"] for pair in pairs)
    pairs.append({"prompt": "It was", "chosen": " fine.", "rejected": " not", "chosen_ended": True,
                  "rejected_ended": False})
    examples, _ = data.tokenize_pairs(pairs, tok, max_length=32)
    assert len(examples) == len(pairs)
    for pair, (chosen, rejected) in zip(pairs, examples):
        for key, example in (("chosen", chosen), ("rejected", rejected)):
            response = example.input_ids[example.n_prompt :]
            assert response == tok.encode(pair[key]) + ([tok.eos_id] if pair[f"{key}_ended"] else [])
