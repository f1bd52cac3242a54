"""Greater-than (Hanna et al. 2023): "The war lasted from the year 1745 to the year 17" -> a later year.

The corrupted prompt starts in the century's year 01 ("... from the year 1701 ..."), where every ending is later.
What comes next depends on how the tokenizer writes years:

* digit by digit (SmolLM2, Gemma 3, tokenizer=None): the next token is the end year's tens digit. The answers
  are the digits above the start year's tens digit, the wrong answers those below; the start year's own
  digit is neither (the end year could fall in the same decade). Start years have tens digit 1 to 8.
* two digits at a time (GPT-2): the classic answers, the two-digit endings YY+1..99, the wrong answers 00..YY-1,
  each kept only if it is one token. Start years run 02..98.

Answers are sets; ``logit_diff`` compares the mean logit of each set, accuracy the best of each.

Spans: ``XX`` the start year's century ("17"), ``YY`` its last two digits ("45", what the answer is compared
with), ``END`` the last token (the end year's last digit, or both its digits when years go two digits a token).

Checked with the tokenizers of SmolLM2-135M and Gemma-3-270m (both digit by digit; Gemma writes " 1745" as
"▁", "1", "7", "4", "5" after its ``<bos>``), the tests' word stand-in (two digits a token), and none: 128
examples, seeds 0 and 1. Any other way of writing years (three digits a token, as Llama 3's tokenizer does) is a
``CircuitsError`` before anything runs.
"""

from __future__ import annotations

from circuits.errors import CircuitsError

from ._common import Example, Tokens, build, fill, under

DESCRIPTION = "greater-than: 'The war lasted from the year 1745 to the year 17' -> a year after 1745"

NOUNS = [
    "war", "siege", "drought", "famine", "plague", "expedition", "dynasty", "reign", "occupation", "rebellion",
    "conflict", "voyage", "campaign", "truce", "pilgrimage", "journey", "crusade", "alliance", "epidemic", "feud",
]  # fmt: skip
CENTURIES = ["12", "13", "14", "15", "16", "17", "18"]
TEMPLATE = "The {noun} lasted from the year {century}{start} to the year {century}"


def year_scheme(tokenizer) -> str:
    """``"digits"`` if the tokenizer writes years one digit a token (or there is none), ``"pairs"`` for two."""
    if tokenizer is None:
        return "digits"
    ids = tokenizer(" 1745", add_special_tokens=False)["input_ids"]
    pieces = [tokenizer.decode([i]).strip() for i in ids]
    if pieces[-2:] == ["4", "5"]:
        return "digits"
    if pieces[-1:] == ["45"] and "".join(pieces) == "1745":
        return "pairs"
    raise CircuitsError(
        f"{under('greater_than', tokenizer)}: the template needs years written one digit a token or two digits a "
        f"token (the end year's next digits as one answer token), but ' 1745' is {pieces}"
    )


def generate(tokenizer=None, n: int = 64, seed: int = 0):
    tokens = Tokens(tokenizer)
    scheme = year_scheme(tokenizer)
    end_digits = 1 if scheme == "digits" else 2  # how many digits the last token (END) holds

    def draw(rng):
        century = rng.choice(CENTURIES)
        noun = rng.choice(NOUNS)
        if scheme == "digits":
            tens = rng.randint(1, 8)
            start = f"{tens}{rng.randint(0, 9)}"
            answers = [str(d) for d in range(tens + 1, 10)]
            wrong = [str(d) for d in range(tens)]
        else:
            year = rng.randint(2, 98)
            start = f"{year:02d}"
            answers = [f"{y:02d}" for y in range(year + 1, 100) if tokens.single(f"{y:02d}")]
            wrong = [f"{y:02d}" for y in range(year) if tokens.single(f"{y:02d}")]
            if not answers or not wrong:
                return None
        clean, at = fill(TEMPLATE, noun=noun, century=century, start=start)
        corrupted = TEMPLATE.format(noun=noun, century=century, start="01")
        spans = {"XX": at["century"], "YY": at["start"], "END": [len(clean) - end_digits, len(clean)]}
        return Example(clean, corrupted, answers, wrong, spans)

    return build("greater_than", n, seed, tokens, draw)
