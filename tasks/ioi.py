"""Indirect object identification (Wang et al. 2022).

"When Mary and John went to the store, John gave a drink to" -> " Mary" (the indirect object), not " John"
(the subject, named twice). Half the prompts name the indirect object first (ABBA), half the subject (BABA).
The corrupted prompt is the same sentence with three other names, all different (the "ABC" corruption),
so that nothing in it points at either answer; the answers stay those of the clean prompt.

Spans (Wang et al.'s positions): ``IO`` the indirect object, ``S1`` the subject's first mention, ``S1+1`` the word
after it, ``S2`` the subject's second mention, ``END`` the last token.

Checked with the tokenizers of SmolLM2-135M (79 of the 80 names are one token) and Gemma-3-270m (all 80; it
adds ``<bos>``), the tests' GPT-2-like word stand-in, and none: 128 examples, seeds 0 and 1.
"""

from __future__ import annotations

import re

from . import _names
from ._common import Example, Tokens, build, enough, fill, last_token

DESCRIPTION = "indirect object identification: 'When Mary and John went to the store, John gave a drink to' -> ' Mary'"

# {A} and {B} are the two names of the first clause, {C} the subject who repeats.
TEMPLATES = [
    "When {A} and {B} went to the {place}, {C} gave a {thing} to",
    "After {A} and {B} went to the {place}, {C} gave a {thing} to",
    "While {A} and {B} were working at the {place}, {C} gave a {thing} to",
    "Then, {A} and {B} went to the {place}. {C} handed a {thing} to",
    "Friends {A} and {B} found a {thing} at the {place}. {C} gave it to",
    "When {A} and {B} got a {thing} at the {place}, {C} decided to give it to",
    "Afterwards, {A} and {B} went to the {place}, and {C} passed a {thing} to",
    "Then, {A} and {B} had a long argument. Afterwards {C} said to",
]
PLACES = ["store", "park", "school", "office", "hospital", "restaurant", "station", "beach", "garden", "market"]
THINGS = ["drink", "book", "ring", "ball", "bag", "letter", "gift", "cake", "pen", "basket"]
NEXT_WORD = re.compile(r" \w+")  # S1+1: the word after the first subject mention, with its leading space


def generate(tokenizer=None, n: int = 64, seed: int = 0):
    tokens = Tokens(tokenizer)
    names = tokens.singles(_names.ALL)
    enough("ioi", "names", names, 5, tokens)

    def draw(rng):
        template = rng.choice(TEMPLATES)
        place, thing = rng.choice(PLACES), rng.choice(THINGS)
        io, subject, *others = rng.sample(names, 5)
        first, second = (io, subject) if rng.random() < 0.5 else (subject, io)  # ABBA or BABA
        clean, at = fill(template, A=first, B=second, C=subject, place=place, thing=thing)
        corrupted = template.format(A=others[0], B=others[1], C=others[2], place=place, thing=thing)
        io_at, s1_at = (at["A"], at["B"]) if first == io else (at["B"], at["A"])
        spans = {
            "IO": io_at,
            "S1": s1_at,
            "S1+1": list(NEXT_WORD.match(clean, s1_at[1]).span()),
            "S2": at["C"],
            "END": last_token(clean),
        }
        return Example(clean, corrupted, " " + io, " " + subject, spans)

    return build("ioi", n, seed, tokens, draw)
