import random
import re

import pytest

from minalign import task
from minalign.tokenizer import get_tokenizer

SENTIMENT_SLOTS = {"pos", "pos_film", "neg", "neg_film", "pos_adverb", "neg_adverb",
                   "pos_verb", "neg_verb"}


def test_splits_sizes_disjoint_and_deterministic():
    splits = {s: task.reviews(s) for s in ("train", "val", "test")}
    assert {s: len(r) for s, r in splits.items()} == task.SPLITS
    assert len(set().union(*splits.values())) == sum(task.SPLITS.values())  # all distinct
    assert task.reviews("val", 5) == splits["val"][:5]
    # a fresh generation from the seed gives the same corpus
    task.corpus.cache_clear()
    assert task.reviews("test") == splits["test"]


def test_reviews_are_short_sentences():
    for review in task.reviews("train", 2000):
        assert task.MIN_WORDS <= len(review.split()) <= task.MAX_WORDS
        assert review[0].isupper() and review[-1] in ".!"
        assert not re.search(r"\ba [aeiou]", review), review  # "an amazing", not "a amazing"


def test_unknown_split():
    with pytest.raises(ValueError, match="train"):
        task.reviews("dev")


def test_write_review_depends_on_seed():
    one = [task.write_review(random.Random(1)) for _ in range(3)]
    assert one == [task.write_review(random.Random(1)) for _ in range(3)]
    assert one[0] != task.write_review(random.Random(2))


def test_sentiment_words_in_vader_lexicon_with_their_sign():
    lexicon = task._analyzer().lexicon
    for word in task.POSITIVE_FILM + task.POSITIVE_ADVERBS + task.POSITIVE_VERBS:
        assert lexicon.get(word.split()[0], 0) > 0, word
    for word in task.NEGATIVE_FILM + task.NEGATIVE_ADVERBS + task.NEGATIVE_VERBS:
        assert lexicon.get(word.split()[0], 0) < 0, word
    # and no other slot word carries sentiment of its own
    others = {w for slot, words in task.SLOTS.items() if slot not in SENTIMENT_SLOTS for w in words}
    assert not {w for phrase in others for w in phrase.lower().split() if w in lexicon}


def test_neutral_sentences_score_zero():
    rng = random.Random(0)
    for template in task.NEUTRAL_SENTENCES:
        sentence = task.fill(template, rng, {"film": "film"}, set())
        assert task.gold_reward([sentence]) == [0.0], sentence


def test_gold_reward_ranks_sentiment():
    good, bad, flat = task.gold_reward([
        "The acting was brilliant and I loved every minute of it.",
        "The plot was boring and the ending was awful. Avoid this one.",
        "It runs about two hours.",
    ])
    assert good > 0.5 > flat == 0.0 > -0.5 > bad
    assert task.gold_reward(["The plot was not good."])[0] < 0  # VADER reads negation


def test_corpus_has_room_to_improve():
    scores = task.gold_reward(task.reviews("val"))
    mean = sum(scores) / len(scores)
    assert -0.2 < mean < 0.3
    assert sum(s > 0.5 for s in scores) / len(scores) < 0.5
    assert sum(s < -0.5 for s in scores) / len(scores) > 0.15


@pytest.mark.parametrize("name", ["builtin", "gpt2"])
def test_prompts_are_seeded_review_openings_of_2_to_8_tokens(name):
    tok = get_tokenizer(name)
    prompts = task.prompts("test", tok, n=200, seed=3)
    assert prompts == task.prompts("test", tok, n=200, seed=3)
    assert prompts != task.prompts("test", tok, n=200, seed=4)
    lengths = [len(tok.encode(p)) for p in prompts]
    assert min(lengths) >= 2 and max(lengths) <= 8
    assert len(set(lengths)) > 3  # lengths vary
    for prompt, review in zip(prompts, task.reviews("test", 200)):
        assert review.startswith(prompt)


def test_gold_reward_leaves_out_a_decoded_eos():
    from minalign.tokenizer import EOS

    assert task.EOS_TEXT == EOS
    assert task.gold_reward(["The acting was good." + EOS]) == task.gold_reward(["The acting was good."])
    assert task.gold_reward(["The acting was good."])[0] > 0.4
