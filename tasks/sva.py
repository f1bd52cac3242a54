"""Subject-verb agreement: "The keys to the cabinet" -> " are", not " is".

The subject is singular or plural, often followed by a prepositional phrase whose noun (the attractor)
has the other number or the same one at random. The corrupted prompt swaps the subject for its other
number ("key" for "keys"), so the verb that agreed with the clean subject no longer does. Each example
asks for " is"/" are" or " was"/" were". Spans: ``SUBJ`` the subject noun, ``END`` the last token (absent where
the subject is the last token, "The old keys": the logits are then read at ``SUBJ``).

Checked with the tokenizers of SmolLM2-135M and Gemma-3-270m (all 34 noun pairs are one token a word under both;
Gemma adds ``<bos>``), the tests' word stand-in, and none: 128 examples, seeds 0 and 1.
"""

from __future__ import annotations

from ._common import Example, Tokens, build, enough, fill, last_token

DESCRIPTION = "subject-verb agreement: 'The keys to the cabinet' -> ' are' rather than ' is'"

NOUNS = [
    ("key", "keys"), ("author", "authors"), ("pilot", "pilots"), ("doctor", "doctors"), ("farmer", "farmers"),
    ("teacher", "teachers"), ("student", "students"), ("dog", "dogs"), ("cat", "cats"), ("friend", "friends"),
    ("girl", "girls"), ("boy", "boys"), ("child", "children"), ("man", "men"), ("woman", "women"),
    ("senator", "senators"), ("manager", "managers"), ("player", "players"), ("officer", "officers"),
    ("picture", "pictures"), ("book", "books"), ("car", "cars"), ("house", "houses"), ("letter", "letters"),
    ("report", "reports"), ("bird", "birds"), ("painting", "paintings"), ("tree", "trees"), ("song", "songs"),
    ("artist", "artists"), ("lawyer", "lawyers"), ("worker", "workers"), ("nurse", "nurses"), ("soldier", "soldiers"),
]  # fmt: skip
ATTRACTORS = [
    ("cabinet", "cabinets"), ("table", "tables"), ("building", "buildings"), ("garden", "gardens"),
    ("river", "rivers"), ("window", "windows"), ("school", "schools"), ("office", "offices"), ("park", "parks"),
    ("bridge", "bridges"), ("church", "churches"), ("farm", "farms"), ("station", "stations"), ("road", "roads"),
]  # fmt: skip
TEMPLATES = [
    "The {subject} to the {attractor}",
    "The {subject} near the {attractor}",
    "The {subject} behind the {attractor}",
    "The {subject} next to the {attractor}",
    "The {subject} from the {attractor}",
    "The {subject} in front of the {attractor}",
    "The {subject} that I saw yesterday",
    "The old {subject}",
]
VERBS = [(" is", " are"), (" was", " were")]


def generate(tokenizer=None, n: int = 64, seed: int = 0):
    tokens = Tokens(tokenizer)
    nouns = [pair for pair in NOUNS if all(tokens.single(" " + word) for word in pair)]
    enough("sva", "singular/plural noun pairs", nouns, 2, tokens)

    def draw(rng):
        template = rng.choice(TEMPLATES)
        subject = rng.choice(nouns)
        plural = rng.random() < 0.5
        attractor = rng.choice(ATTRACTORS)[rng.random() < 0.5]
        verbs = rng.choice(VERBS)
        clean, at = fill(template, subject=subject[plural], attractor=attractor)
        corrupted = template.format(subject=subject[not plural], attractor=attractor)
        end = last_token(clean)
        spans = {"SUBJ": at["subject"], "END": None if end == at["subject"] else end}  # "The old keys": no END
        return Example(clean, corrupted, verbs[plural], verbs[not plural], spans)

    return build("sva", n, seed, tokens, draw)
