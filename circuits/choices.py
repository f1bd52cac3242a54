"""Every list of choices the package offers, declared once: a ``Literal`` for type checkers, a tuple for
checks, the CLI and docstrings. ``check_choice`` and ``check_positive`` are the argument checks that use them.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

from .errors import CircuitsError

Method = Literal["eap", "eap-ig-inputs", "eap-ig-activations", "eap-ig-mask", "clean-corrupted", "exact"]
Ablation = Literal["patching", "mean", "zero"]
MetricName = Literal["logit_diff", "prob_diff", "kl", "l2"]
Level = Literal["edge", "node", "neuron", "mlp-neuron"]
CircuitLevel = Literal["edge", "neuron", "mlp-neuron"]  # the units a circuit keeps (node scores select none)
Selection = Literal["signed", "absolute", "greedy"]
LearnMethod = Literal["edge-pruning", "ugs"]
LearnObjective = Literal["kl", "metric"]
Backward = Literal["gradient", "gim", "relp"]  # the gradient methods' backward pass (circuits.arch.rules)

METHODS: tuple[str, ...] = get_args(Method)
ABLATIONS: tuple[str, ...] = get_args(Ablation)
METRICS: tuple[str, ...] = get_args(MetricName)
LEVELS: tuple[str, ...] = get_args(Level)
CIRCUIT_LEVELS: tuple[str, ...] = get_args(CircuitLevel)
SELECTIONS: tuple[str, ...] = get_args(Selection)
LEARN_METHODS: tuple[str, ...] = get_args(LearnMethod)
LEARN_OBJECTIVES: tuple[str, ...] = get_args(LearnObjective)
BACKWARDS: tuple[str, ...] = get_args(Backward)


def check_choice(what: str, value: Any, choices: tuple[str, ...]) -> None:
    """A CircuitsError naming ``what``, the bad value and the choices, unless ``value`` is one of them."""
    if value not in choices:
        raise CircuitsError(f"unknown {what} {value!r}; choose one of {', '.join(map(str, choices))}")


def check_positive(what: str, value: Any) -> None:
    """A CircuitsError unless ``value`` is a positive integer (not a bool)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise CircuitsError(f"{what} must be a positive integer, got {value!r}")
