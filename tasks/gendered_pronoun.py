"""Gendered pronouns (after Mathwin et al. 2023): "So John is a really great friend, isn't" -> " he", not " she".

The corrupted prompt puts a name of the other gender in the same place (names are single tokens, so the
pair stays the same length); the answer is the pronoun of the clean name, the wrong answer the other.
Spans: ``NAME`` the name, ``END`` the last token.

Checked with the tokenizers of SmolLM2-135M and Gemma-3-270m (" he", " she" and the names are one token; Gemma
adds ``<bos>``), the tests' word stand-in, and none: 128 examples, seeds 0 and 1.
"""

from __future__ import annotations

from . import _names
from ._common import Example, Tokens, build, enough, fill, last_token

DESCRIPTION = "gendered pronoun: 'So John is a really great friend, isn't' -> ' he' rather than ' she'"

TEMPLATES = [
    "So {name} is a really great friend, isn't",
    "So {name} is such a good cook, isn't",
    "Well, {name} was very kind to us, wasn't",
    "I think {name} is coming to the party tonight, isn't",
    "Yesterday {name} called me because",
    "After the meeting, {name} told everyone that",
    "When {name} woke up this morning,",
    "I asked {name} about the trip, and",
]
PRONOUNS = {"male": " he", "female": " she"}


def generate(tokenizer=None, n: int = 64, seed: int = 0):
    tokens = Tokens(tokenizer)
    names = {"male": tokens.singles(_names.MALE), "female": tokens.singles(_names.FEMALE)}
    for gender, pool in names.items():
        enough("gendered_pronoun", f"{gender} names", pool, 1, tokens)

    def draw(rng):
        template = rng.choice(TEMPLATES)
        gender, other = ("male", "female") if rng.random() < 0.5 else ("female", "male")
        clean, at = fill(template, name=rng.choice(names[gender]))
        corrupted = template.format(name=rng.choice(names[other]))
        spans = {"NAME": at["name"], "END": last_token(clean)}
        return Example(clean, corrupted, PRONOUNS[gender], PRONOUNS[other], spans)

    return build("gendered_pronoun", n, seed, tokens, draw)
