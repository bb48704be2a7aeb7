"""The built-in task: steer a small language model towards positive movie reviews.

This is the IMDb experiment of the DPO paper (Rafailov et al. 2023, section 6.1) at
laptop scale and fully offline:

- a corpus of short movie reviews, written here by a small grammar, stands in for IMDb;
- the policy is given the first 2-8 tokens of a held-out review and writes the rest;
- a sentiment model scores the whole review: that gold reward stands in for human
  judgement. It labels preference pairs and evaluates policies.

The gold judge is VADER (Hutto & Gilbert 2014), a rule-based sentiment model whose
lexicon ships with the `vaderSentiment` package. Its compound score is in [-1, 1].
Every sentiment word of the grammar is in VADER's lexicon with the intended sign, and
every other word is absent from it, so neutral sentences score exactly 0 (the tests
check both). VADER also reads the grammar's intensifiers ("very", "really"),
dampeners ("somewhat"), negations ("not") and contrasts ("but": the clause after it
weighs more). It is a word-level model with blind spots a policy can find: its
negation looks three words back across a full stop ("The ending was not bad. I hated
it." scores +0.74; 148 of the corpus's reviews are touched by this), and it reads
English only.

Corpus (one fixed seed, 22,000 distinct reviews): 20,000 train / 1,000 val / 1,000
test, consecutive slices of one stream, so they are disjoint. Reviews are 1-3
sentences of 8-40 words (mean 15.9; 18.7 builtin tokens, 18.9 GPT-2 tokens), mixed
in tone: 35% positive, 30% negative, 20% mixed, 15% neutral. Gold scores over the
train split: mean +0.07, 37% above +0.5, 28% below -0.5, 17% exactly 0 (test: +0.05,
37%, 31%, 18%). So a policy has room to improve: the reviews it learns to imitate
average near 0, while a plainly positive review scores above +0.8.
"""

import functools
import random
import re

from minalign.cli import ArgumentError, flag

# ---------------------------------------------------------------------------------
# The grammar. A review has a tone; each tone draws its sentences from the pools below.

ASPECTS = [  # take "was"
    "acting", "plot", "story", "script", "dialogue", "ending", "soundtrack", "music",
    "cinematography", "direction", "pacing", "editing", "camera work", "premise",
    "lead performance", "final act", "opening scene", "cast", "score", "second half",
]
ASPECTS_PLURAL = [  # take "were"
    "characters", "performances", "effects", "costumes", "visuals", "action scenes",
    "songs", "sets", "minor roles", "chase scenes",
]
FILMS = ["film", "movie", "picture", "drama", "western", "mystery", "documentary",
         "sequel", "musical", "remake", "biopic"]

# Every positive word below has a positive VADER valence, every negative one a negative.
POSITIVE = ["good", "great", "wonderful", "excellent", "brilliant", "superb", "fantastic",
            "amazing", "impressive", "lovely", "delightful", "outstanding", "remarkable",
            "terrific", "strong", "solid", "fresh", "engaging", "perfect", "magnificent",
            "splendid", "beautiful", "gorgeous", "stunning", "compelling", "pleasant"]
POSITIVE_FILM = POSITIVE + ["funny", "charming", "clever", "enjoyable", "entertaining",
                            "interesting", "thrilling", "heartfelt", "hilarious", "sweet",
                            "powerful", "fun"]
NEGATIVE = ["bad", "awful", "terrible", "boring", "dull", "weak", "poor", "horrible",
            "dreadful", "disappointing", "messy", "lazy", "lame", "lousy", "pathetic",
            "embarrassing", "confusing", "ridiculous", "annoying", "ugly"]
NEGATIVE_FILM = NEGATIVE + ["stupid", "painful", "frustrating", "irritating",
                            "unpleasant", "dumb", "miserable"]
POSITIVE_ADVERBS = ["beautifully", "wonderfully", "perfectly", "brilliantly"]
NEGATIVE_ADVERBS = ["badly", "terribly", "horribly"]
CRAFTED = ["shot", "acted", "written", "edited", "directed", "paced", "cast", "scored"]
POSITIVE_VERBS = ["loved", "enjoyed", "liked", "adored", "admired"]
NEGATIVE_VERBS = ["hated", "disliked", "regret watching", "despised"]
OBJECTS = ["it", "this one", "every minute of it", "the whole thing", "this {film}"]
# VADER boosts the next word by some of these ("very", "really" ...), damps it after
# "somewhat", and ignores "rather" and "fairly" (in neither its boosters nor its lexicon).
DEGREES = ["", "", "", "very ", "really ", "quite ", "extremely ", "incredibly ",
           "somewhat ", "rather ", "fairly "]
RECOMMEND_DEGREES = ["", "", "highly ", "really "]
# Descriptions that VADER does not score: no word here is in its lexicon.
NEUTRAL = ["long", "short", "quiet", "simple", "familiar", "conventional", "dark",
           "old-fashioned", "straightforward", "understated", "plain",
           "unusual", "loud"]

NEUTRAL_SENTENCES = [
    "I saw it on a {day} {daytime}.",
    "It runs about {length}.",
    "The story follows a {person} in {place}.",
    "It is based on a {source}.",
    "Most of it takes place in {place}.",
    "I watched it with my {company}.",
    "It is the {ordinal} {film} from this director.",
    "The {aspect} was {neutral}.",
    "The {aspects} were {neutral}.",
    "The {aspect} was {neutral} and the {aspects} were {neutral}.",
]
POSITIVE_SENTENCES = [
    "The {aspect} was {degree}{pos}.",
    "The {aspects} were {degree}{pos}.",
    "The {aspect} felt {degree}{pos}.",
    "It is a {degree}{pos_film} {film}.",
    "What a {pos_film} {film}!",
    "The {film} was {degree}{pos_film} from start to finish.",
    "I {pos_verb} {object}.",
    "The {aspect} was not {neg}.",
    "It was {pos_adverb} {crafted}.",
    "I would {recommend_degree}recommend it to anyone.",
    "The {aspect} was {pos} and the {aspects} were {pos}.",
    "I laughed all the way through.",
    "I smiled for most of it.",
    "It was worth every minute.",
]
NEGATIVE_SENTENCES = [
    "The {aspect} was {degree}{neg}.",
    "The {aspects} were {degree}{neg}.",
    "The {aspect} felt {degree}{neg}.",
    "It is a {degree}{neg_film} {film}.",
    "What a {neg_film} {film}!",
    "The {film} was {degree}{neg_film} from start to finish.",
    "I {neg_verb} {object}.",
    "The {aspect} was not {degree}{pos}.",
    "It was {neg_adverb} {crafted}.",
    "I would not recommend it to anyone.",
    "The {aspect} was {neg} and the {aspects} were {neg}.",
    "It was a waste of time.",
    "Avoid this one.",
    "I was bored most of the time.",
]
MIXED_SENTENCES = [
    "The {aspect} was {degree}{pos}, but the {aspects} were {neg}.",
    "The {aspect} was {degree}{neg}, but the {aspects} were {pos}.",
    "The {aspects} were {pos}, but the {aspect} felt {degree}{neg}.",
    "The {aspects} were {neg}, but the {aspect} felt {degree}{pos}.",
    "It is a {pos_film} {film}, but the {aspect} was {neg}.",
    "It is a {neg_film} {film}, but the {aspect} was {pos}.",
]
OPENERS = ["Overall, ", "In short, ", "All in all, ", "Frankly, ", "To me, "]

FILLERS = {
    "day": ["Monday", "Tuesday", "Friday", "Saturday", "Sunday", "Wednesday", "long"],
    "daytime": ["afternoon", "evening", "night", "morning", "flight"],
    "length": ["two hours", "ninety minutes", "an hour and a half", "three hours",
               "two and a half hours"],
    "person": ["young teacher", "retired detective", "lighthouse keeper", "chef",
               "boxer", "taxi driver", "widow", "sailor", "painter", "mechanic",
               "schoolteacher", "young doctor", "journalist", "soldier", "singer"],
    "place": ["a small town", "a big city", "a coastal village", "London", "Tokyo",
              "Rome", "Lisbon", "the suburbs", "a harbour town", "the desert",
              "the mountains", "a hospital", "Paris"],
    "source": ["book", "short story", "comic book", "stage show", "memoir",
               "radio serial"],
    "company": ["sister", "brother", "parents", "kids", "roommate", "grandmother",
                "uncle", "cousin", "wife", "husband", "colleagues", "students"],
    "ordinal": ["second", "third", "fourth", "latest", "first"],
}
SLOTS = {  # slot name -> the words it draws from
    "aspect": ASPECTS, "aspects": ASPECTS_PLURAL, "film": FILMS, "pos": POSITIVE,
    "pos_film": POSITIVE_FILM, "neg": NEGATIVE, "neg_film": NEGATIVE_FILM,
    "pos_adverb": POSITIVE_ADVERBS, "neg_adverb": NEGATIVE_ADVERBS, "crafted": CRAFTED,
    "pos_verb": POSITIVE_VERBS, "neg_verb": NEGATIVE_VERBS, "object": OBJECTS,
    "degree": DEGREES, "recommend_degree": RECOMMEND_DEGREES, "neutral": NEUTRAL, **FILLERS,
}
# tone -> (probability, sentence pools with their weights)
TONES = {
    "positive": (0.35, [(POSITIVE_SENTENCES, 0.8), (NEUTRAL_SENTENCES, 0.2)]),
    "negative": (0.30, [(NEGATIVE_SENTENCES, 0.8), (NEUTRAL_SENTENCES, 0.2)]),
    "mixed": (0.20, [(MIXED_SENTENCES, 0.5), (POSITIVE_SENTENCES, 0.2),
                     (NEGATIVE_SENTENCES, 0.2), (NEUTRAL_SENTENCES, 0.1)]),
    "neutral": (0.15, [(NEUTRAL_SENTENCES, 1.0)]),
}
MIN_WORDS, MAX_WORDS = 8, 40
SPLITS = {"train": 20_000, "val": 1_000, "test": 1_000}
SEED = 20230529  # the corpus seed; the splits are consecutive slices of one stream


def fill(template: str, rng: random.Random, pinned: dict[str, str], seen: set[str]) -> str:
    """Fill every {slot} of a sentence template with a word drawn from its list.

    `pinned` holds a slot to one word for the whole review (the review is about one
    "film"); `seen` holds the words drawn so far, which are not drawn again when the
    list has others (no "The ending was good. The ending was ..." within a review).
    """
    out = template
    while "{" in out:
        start, end = out.index("{"), out.index("}")
        slot = out[start + 1:end]
        if slot not in pinned:
            words = [w for w in SLOTS[slot] if w not in seen] or SLOTS[slot]
            word = rng.choice(words)
            if word:
                seen.add(word)
        else:
            word = pinned[slot]
        out = out[:start] + word + out[end + 1:]  # a word may hold a slot: "this {film}"
    return re.sub(r"\b([Aa]) (?=[aeiou])", r"\1n ", out)  # "a amazing" -> "an amazing"


def write_review(rng: random.Random) -> str:
    """One review: pick a tone, then 1-3 sentences from its pools (more if too short)."""
    tones = list(TONES)
    tone = rng.choices(tones, weights=[TONES[t][0] for t in tones])[0]
    pools, weights = zip(*TONES[tone][1])
    n_sentences = rng.choice([1, 2, 2, 3, 3])
    pinned, seen = {"film": rng.choice(FILMS)}, set()
    templates, sentences = [], []
    while len(sentences) < n_sentences or len(" ".join(sentences).split()) < MIN_WORDS:
        template = rng.choice(rng.choices(pools, weights=weights)[0])
        if template not in templates:
            templates.append(template)
            sentences.append(fill(template, rng, pinned, seen))
    if len(sentences) > 1 and rng.random() < 0.25:  # "Overall, the plot was good."
        last = sentences[-1]
        if not last.startswith("I "):
            last = last[0].lower() + last[1:]
        sentences[-1] = rng.choice(OPENERS) + last
    return " ".join(sentences)


@functools.lru_cache(maxsize=1)
def corpus() -> tuple[str, ...]:
    """All distinct reviews of the three splits, in generation order (deterministic)."""
    rng = random.Random(SEED)
    seen, out = set(), []
    while len(out) < sum(SPLITS.values()):
        review = write_review(rng)
        if review not in seen and len(review.split()) <= MAX_WORDS:
            seen.add(review)
            out.append(review)
    return tuple(out)


def reviews(split: str, n: int | None = None) -> list[str]:
    """The reviews of a split ("train" | "val" | "test"); the first n if n is given."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: expected one of {list(SPLITS)}")
    start = sum(SPLITS[s] for s in list(SPLITS)[: list(SPLITS).index(split)])
    out = list(corpus()[start:start + SPLITS[split]])
    if n is not None:
        if n > len(out):
            raise ValueError(f"split {split!r} has {len(out)} reviews, asked for {n}")
        out = out[:n]
    return out


MAX_PROMPT_TOKENS = 8  # the longest prompt: a block of max_length leaves the rest for the response


def check_counts(args, train=(), val=(), test=(), max_length=()) -> None:
    """Refuse, naming the flag, a run the built-in task cannot feed: more prompts than a
    split has reviews (`train`, `val`, `test`: names of fields counting prompts of that
    split), or a `max_length` field that leaves no room after the longest prompt."""
    for names, split in ((train, "train"), (val, "val"), (test, "test")):
        for name in names:
            if getattr(args, name) is not None and getattr(args, name) > SPLITS[split]:
                raise ArgumentError(f"{flag(name)} {getattr(args, name)}: the built-in task's {split} split "
                                    f"has {SPLITS[split]:,} reviews")
    for name in max_length:
        if getattr(args, name) <= MAX_PROMPT_TOKENS:
            raise ArgumentError(f"{flag(name)} {getattr(args, name)}: the built-in task's prompts take up to "
                                f"{MAX_PROMPT_TOKENS} tokens, and a response needs at least one more")


def prompts(split: str, tokenizer, n: int | None = None, seed: int = 0,
            min_tokens: int = 2, max_tokens: int = MAX_PROMPT_TOKENS) -> list[str]:
    """Review openings to complete: the first k tokens of each review, k drawn in
    [min_tokens, max_tokens] by `seed`, decoded back to text.

    A prefix that ends inside a word may encode differently once it is text (" surpr"
    need not be the tokens it was cut from); k is then lowered until the prompt text
    encodes to exactly its k tokens, so len(tokenizer.encode(prompt)) is in range.
    """
    rng = random.Random(seed)
    out = []
    for review in reviews(split, n):
        ids = tokenizer.encode(review)
        k = min(rng.randint(min_tokens, max_tokens), len(ids) - 1)
        while k > min_tokens and tokenizer.encode(tokenizer.decode(ids[:k])) != ids[:k]:
            k -= 1
        out.append(tokenizer.decode(ids[:k]))
    return out


@functools.lru_cache(maxsize=1)
def _analyzer():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()  # reads its lexicon once


EOS_TEXT = "<|endoftext|>"  # minalign.tokenizer.EOS (a test holds them equal)

def gold_reward(texts: list[str]) -> list[float]:
    """The gold judge: VADER's compound sentiment of each full text, in [-1, 1]. An
    end-of-text marker written out as text (a decoded EOS) is not part of the review
    and is left out (VADER would score the review 0 with it)."""
    analyzer = _analyzer()
    return [analyzer.polarity_scores(t.replace(EOS_TEXT, " "))["compound"] for t in texts]
