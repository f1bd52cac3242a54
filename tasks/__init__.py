"""The task catalogue: classic circuit tasks (IOI, greater-than, induction, ...) as circuits.Task.

    from circuits import tasks
    tasks.available()                                   # {name: one-line description}
    task = tasks.get("ioi", model.tokenizer, n=128, seed=0)

With a tokenizer, every generator keeps only the names, words and answers that are one token, and only
pairs whose clean and corrupted prompts tokenize to the same length; it returns exactly ``n`` examples
or raises ``circuits.CircuitsError``. Without one it returns text built from word lists chosen to be single tokens
in common tokenizers (induction, which is naturally about token ids, returns ids 1..60 for the tiny
test models). A seed always gives the same task; the generators draw from their own ``random.Random``.
Every task declares spans (``circuits.spans``), the positions that play each role, named in its generator's
docstring; ``END`` is always the last token, where the logits are read.
"""

from __future__ import annotations

from types import ModuleType

from circuits.errors import CircuitsError
from circuits.task import Task

from . import capitals, docstring, gendered_pronoun, greater_than, induction, ioi, sva

_GENERATORS: dict[str, ModuleType] = {
    "ioi": ioi,
    "greater_than": greater_than,
    "induction": induction,
    "docstring": docstring,
    "sva": sva,
    "capitals": capitals,
    "gendered_pronoun": gendered_pronoun,
}


def available() -> dict[str, str]:
    """Every task's name and a one-line description."""
    return {name: module.DESCRIPTION for name, module in _GENERATORS.items()}


def get(name: str, tokenizer=None, n: int = 64, seed: int = 0) -> Task:
    """The catalogue task ``name`` with ``n`` examples drawn with ``seed``, fitted to ``tokenizer`` if given."""
    if name not in _GENERATORS:
        raise CircuitsError(f"unknown task {name!r}; available tasks: {', '.join(_GENERATORS)}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise CircuitsError(f"n must be a positive number of examples, got {n!r}")
    return _GENERATORS[name].generate(tokenizer, n=n, seed=seed)


__all__ = ["available", "get"]
