"""Induction: a random sequence, then its beginning again; predict the token that came next the first time.

Clean: ``A1 .. A10 A1 .. Ak`` -> ``A(k+1)``, with ``k`` from 4 to 9. Corrupted: ``C1 .. C10 A1 .. Ak``, a fresh
first half, so the prompt ends the same way but repeats nothing and ``A(k+1)`` appears nowhere in it.
The wrong answer is a token in neither prompt: the logit difference measures copying the right token from
context against an arbitrary one.

With a tokenizer the tokens are ordinary words, each one token with its leading space, so the text prompts
tokenize to exactly one token a word. Without one the task is token ids 1..60 (0 is padding), the vocabulary
of the tiny test models in ``circuits.testing``.

Spans: ``A`` the repeated token's first occurrence (``Ak``), ``B`` the token after it (``A(k+1)``, the answer),
``END`` its second occurrence, the last token: character ranges of the words, or token positions for ids.

Checked with the tokenizers of SmolLM2-135M and Gemma-3-270m (all 120 words are one token under both; Gemma adds
``<bos>``, which the one-token-a-word check leaves out), the tests' word stand-in, and none: 128 examples,
seeds 0 and 1.
"""

from __future__ import annotations

from itertools import accumulate

from circuits.task import Task

from ._common import Example, Tokens, build, enough

DESCRIPTION = "induction: a random token sequence repeated; predict the next token of the repeat"

FIRST_HALF = 10
SHORTEST_REPEAT, LONGEST_REPEAT = 4, FIRST_HALF - 1
TINY_VOCAB = range(1, 61)

WORDS = [
    "apple", "river", "stone", "cloud", "horse", "table", "garden", "window", "bottle", "candle",
    "forest", "bridge", "mountain", "paper", "silver", "orange", "island", "castle", "engine", "pocket",
    "ladder", "mirror", "blanket", "hammer", "pencil", "rabbit", "tiger", "monkey", "turtle", "eagle",
    "spoon", "plate", "chair", "clock", "shoe", "hat", "coat", "door", "wall", "roof",
    "lake", "ocean", "desert", "valley", "field", "road", "train", "plane", "boat", "truck",
    "bread", "cheese", "butter", "sugar", "honey", "lemon", "pepper", "salt", "rice", "corn",
    "king", "queen", "doctor", "farmer", "teacher", "soldier", "sailor", "pilot", "judge", "baker",
    "music", "dance", "story", "poem", "song", "game", "dream", "light", "shadow", "storm",
    "winter", "summer", "spring", "autumn", "morning", "evening", "night", "moon", "star", "sun",
    "green", "yellow", "purple", "brown", "black", "white", "golden", "wooden", "glass", "metal",
    "copper", "iron", "cotton", "wool", "leather", "paint", "brush", "rope", "chain", "wheel",
    "tower", "temple", "village", "city", "market", "harbor", "school", "church", "prison", "palace",
]  # fmt: skip


def _roles(k: int) -> dict[str, int]:
    """The spans as word (token) indices of a prompt that repeats its first ``k`` words."""
    return {"A": k - 1, "B": k, "END": FIRST_HALF + k - 1}


def _halves(rng, pool):
    """The first half, the corrupted first half and the wrong answer: all distinct items of ``pool``."""
    drawn = rng.sample(pool, 2 * FIRST_HALF + 1)
    return drawn[:FIRST_HALF], drawn[FIRST_HALF:-1], drawn[-1]


def generate(tokenizer=None, n: int = 64, seed: int = 0):
    if tokenizer is None:
        return _token_ids(n, seed)
    tokens = Tokens(tokenizer)
    words = tokens.singles(WORDS)
    enough("induction", "words", words, 2 * FIRST_HALF + 1, tokens)

    def draw(rng):
        k = rng.randint(SHORTEST_REPEAT, LONGEST_REPEAT)
        first, other, wrong = _halves(rng, words)
        pieces = [" " + w for w in first + first[:k]]
        clean = "".join(pieces)
        starts = list(accumulate(map(len, pieces), initial=0))
        corrupted = "".join(" " + w for w in other + first[:k])
        # One token a word, or the repeat would not line up token for token (special tokens such as Gemma's
        # <bos> are the same in both prompts and do not count).
        if tokens.pieces(clean) != FIRST_HALF + k:
            return "the words do not tokenize one token a word in sequence"
        spans = {name: [starts[i], starts[i + 1]] for name, i in _roles(k).items()}
        return Example(clean, corrupted, " " + first[k], " " + wrong, spans)

    return build("induction", n, seed, tokens, draw)


def _token_ids(n: int, seed: int):
    """The same task as token ids, built by drawing text over the tiny vocabulary's ids and converting back."""
    vocab = [str(i) for i in TINY_VOCAB]

    def draw(rng):
        k = rng.randint(SHORTEST_REPEAT, LONGEST_REPEAT)
        first, other, wrong = _halves(rng, vocab)
        return Example(" ".join(first + first[:k]), " ".join(other + first[:k]), first[k], wrong)

    text = build("induction", n, seed, Tokens(), draw)
    ids = [[[int(t) for t in prompt.split()] for prompt in column] for column in (text.clean, text.corrupted)]
    spans = [_roles(len(prompt) - FIRST_HALF) for prompt in ids[0]]
    return Task.from_token_ids(
        "induction", ids[0], ids[1], [int(a) for a in text.answers], [int(w) for w in text.wrong_answers], spans=spans
    )
