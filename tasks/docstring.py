'''Docstring (Heimersheim & Janiak 2023): predict the next parameter a Sphinx docstring documents.

    def port(self, load, size, files, last):
        """oil column piece

        :param load: crime population
        :param size: unit dark
        :param

-> " files". The signature has 3 to 5 parameters; the docstring documents all but the last two, in order,
and the answer is the next one. The wrong answer is the parameter after it, the last of the signature:
the model has to keep the signature's order, not just pick a parameter not yet documented (the earlier
ones would be an easy distractor, ruled out by the docstring itself).

The corrupted prompt renames every parameter, in the signature and in the docstring, to other names: it is
an equally plausible function, but nothing in it points to either answer.

Spans (after Heimersheim & Janiak's names, the answer being C): ``B_DEF`` and ``C_DEF`` the last documented
parameter and the answer in the signature, ``B_DOC`` the last documented parameter in the docstring, ``END`` the
last token ("param").

Checked with the tokenizers of SmolLM2-135M and Gemma-3-270m (all 40 parameter names are one token under both;
Gemma adds ``<bos>``), the tests' word stand-in, and none: 128 examples, seeds 0 and 1.
'''

from __future__ import annotations

from itertools import accumulate

from ._common import Example, Tokens, build, enough, last_token

DESCRIPTION = "docstring: predict the next parameter name after ':param ' in a Python docstring"

PARAMETERS = [
    "load", "size", "files", "last", "name", "path", "data", "value", "count", "index",
    "key", "mode", "text", "user", "items", "limit", "page", "port", "host", "url",
    "token", "config", "state", "width", "height", "color", "source", "target", "query", "result",
    "timeout", "level", "prefix", "format", "message", "options", "context", "parent", "shape", "order",
]  # fmt: skip
# Parameter names appear nowhere else in a prompt: the function names and descriptions use other words.
FUNCTIONS = ["open", "run", "check", "update", "save", "parse", "build", "send", "draw", "fetch", "merge", "split"]
WORDS = [
    "oil", "column", "piece", "crime", "population", "unit", "dark", "table", "river", "number", "market",
    "field", "bank", "light", "stone", "glass", "paper", "record", "signal", "line", "window", "frame",
    "cloud", "wave", "point", "group", "sound", "crowd", "story", "edge", "block", "plant",
]  # fmt: skip


def _prompt(
    function: str, parameters: list[str], documented: int, descriptions: list[str], summary: str
) -> tuple[str, dict[str, list[int]]]:
    """The prompt and its spans (the module's docstring names them)."""
    head = f"def {function}(self, "
    lines = [head + ", ".join(parameters) + "):", f'    """{summary}', ""]
    lines += [f"    :param {p}: {d}" for p, d in zip(parameters[:documented], descriptions, strict=False)]
    text = "\n".join(lines + ["    :param"])
    starts = list(accumulate((len(p) + len(", ") for p in parameters), initial=len(head)))  # in the signature
    b, c = parameters[documented - 1], parameters[documented]
    documented_at = text.rindex(f":param {b}:") + len(":param ")
    spans = {
        "B_DEF": [starts[documented - 1], starts[documented - 1] + len(b)],
        "C_DEF": [starts[documented], starts[documented] + len(c)],
        "B_DOC": [documented_at, documented_at + len(b)],
        "END": last_token(text),
    }
    return text, spans


def generate(tokenizer=None, n: int = 64, seed: int = 0):
    tokens = Tokens(tokenizer)
    names = tokens.singles(PARAMETERS)
    enough("docstring", "parameter names", names, 10, tokens)

    def draw(rng):
        count = rng.randint(3, 5)
        documented = count - 2
        drawn = rng.sample(names, 2 * count)
        clean, corrupted = drawn[:count], drawn[count:]
        function = rng.choice(FUNCTIONS)
        summary = " ".join(rng.sample(WORDS, 3))
        descriptions = [" ".join(rng.sample(WORDS, 2)) for _ in range(documented)]
        prompt, spans = _prompt(function, clean, documented, descriptions, summary)
        return Example(
            prompt,
            _prompt(function, corrupted, documented, descriptions, summary)[0],
            " " + clean[documented],
            " " + clean[documented + 1],
            spans,
        )

    return build("docstring", n, seed, tokens, draw)
