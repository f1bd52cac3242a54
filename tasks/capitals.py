"""Capitals: "The capital of France is" -> " Paris".

The corrupted prompt names another country ("The capital of Spain is"), and the wrong answer is that
country's capital (" Madrid"): the logit difference measures which country the model looked up.
Capitals must be one token; a country may be several, as long as both countries of a pair are as long.
Spans: ``COUNTRY`` the country, ``END`` the last token.

Checked with the tokenizers of SmolLM2-135M (30 of the 33 capitals are one token) and Gemma-3-270m (all 33; it adds
``<bos>``), the tests' word stand-in, and none: 128 examples, seeds 0 and 1.
"""

from __future__ import annotations

from ._common import Example, Tokens, build, enough, fill, last_token

DESCRIPTION = "capitals: 'The capital of France is' -> ' Paris'"

CAPITALS = {
    "France": "Paris", "Spain": "Madrid", "Germany": "Berlin", "Italy": "Rome", "Japan": "Tokyo",
    "Russia": "Moscow", "Egypt": "Cairo", "England": "London", "China": "Beijing", "Greece": "Athens",
    "Austria": "Vienna", "Ireland": "Dublin", "Portugal": "Lisbon", "Poland": "Warsaw", "Norway": "Oslo",
    "Sweden": "Stockholm", "Denmark": "Copenhagen", "Hungary": "Budapest", "Canada": "Ottawa", "Kenya": "Nairobi",
    "Thailand": "Bangkok", "Peru": "Lima", "Cuba": "Havana", "Turkey": "Ankara",
    "Iran": "Tehran", "Iraq": "Baghdad", "Syria": "Damascus", "Lebanon": "Beirut", "Finland": "Helsinki",
    "Belgium": "Brussels", "Australia": "Canberra", "Chile": "Santiago", "Scotland": "Edinburgh",
}  # fmt: skip
TEMPLATES = [
    "The capital of {country} is",
    "The capital city of {country} is",
    "Q: What is the capital of {country}? A:",
    "I am visiting {country}, so I will spend a few days in its capital,",
]


def generate(tokenizer=None, n: int = 64, seed: int = 0):
    tokens = Tokens(tokenizer)
    countries = [country for country, capital in CAPITALS.items() if tokens.single(" " + capital)]
    enough("capitals", "capitals", countries, 2, tokens)

    def draw(rng):
        template = rng.choice(TEMPLATES)
        country, other = rng.sample(countries, 2)
        clean, at = fill(template, country=country)
        spans = {"COUNTRY": at["country"], "END": last_token(clean)}
        return Example(clean, template.format(country=other), " " + CAPITALS[country], " " + CAPITALS[other], spans)

    return build("capitals", n, seed, tokens, draw)
