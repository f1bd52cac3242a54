"""Circuit discovery methods, all on the one engine: attribution patching, exact patching, ACDC."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ..arch.rules import backward_rules
from ..batching import BatchPlan, BatchSize, check_batch_size, parse_memory
from ..choices import (
    ABLATIONS,
    BACKWARDS,
    LEVELS,
    METHODS,
    Ablation,
    Backward,
    Level,
    Method,
    check_choice,
    check_positive,
)
from ..circuit import Scores
from ..errors import CircuitsError
from ..model import Model
from ..resume import open_checkpoint
from ..spans import Spans
from ..task import Task
from ..units import real_edges, unit_names
from .acdc import acdc
from .common import resolution_of
from .exact import MAX_TOKENS, exact_scores
from .gradient import GRADIENT_METHODS, check_gradient_metric, gradient_scores

if set(METHODS) != {*GRADIENT_METHODS, "exact"}:
    raise CircuitsError(f"circuits.choices.METHODS {METHODS} and the registered methods disagree")


def attribute(
    model: Model,
    task: Task,
    method: Method = "eap-ig-inputs",
    ablation: Ablation = "patching",
    batch_size: BatchSize = 32,
    ig_steps: int = 5,
    level: Level = "edge",
    progress: bool = True,
    checkpoint: str | Path | None = None,
    max_memory: int | str | None = None,
    backward: Backward = "gradient",
    positions: bool = False,
) -> Scores:
    """Score every edge (or, with ``level="node"``, every source node) of the model's graph on a task.

    Finer: ``positions=True`` resolves every edge by position, ``[n_src, n_dst, S]``: by the task's declared
    spans (``Task(..., spans=...)``, positions no span names in ``rest``), or every position on its own for a
    task whose prompts have one length; summed over spans they are the edge scores (for the gradient methods;
    ``circuits.spans``). ``level="neuron"`` scores every output dimension of every source ``[n_src, d_model]``,
    ``level="mlp-neuron"`` every MLP hidden unit ``[n_layers, d_mlp]``; a source's neuron scores sum to its
    node score (gradient methods). ``exact`` runs one forward per unit at every level (small models).

    A score estimates mean metric(edge ablated) - mean metric(clean), the metric being the task's.
    ``method`` is one of ``circuits.choices.METHODS``: ``exact`` runs one patched forward per edge,
    the others are the gradient estimates of ``circuits.methods.gradient``. ``ablation`` is one of
    ``ABLATIONS``: ``patching`` (the corrupted prompts' activations), ``mean`` (over the task's clean
    prompts) or ``zero``. Scores are returned on the CPU, in float32 whatever the model's dtype.

    Memory is bounded by ``batch_size``: examples per batch, or ``"auto"``, the most that fit ``max_memory``
    (bytes or a string such as ``"8GiB"``; default: what the model's device has free), sized from the peak
    memory of a first small batch. A batch that runs out of memory is retried with half as many examples
    (one line on stderr says so); see ``circuits.batching``. Scores are sums over examples: any batch size
    gives the same scores up to float rounding.

    ``eap`` takes its gradients at the clean run only, where the ``kl`` and ``l2`` metrics are at their
    minimum (every gradient is zero): that pair is refused; use an EAP-IG method or an answer metric.

    ``backward`` (a gradient method's backward pass, one of ``BACKWARDS``): ``gradient``, the exact gradients;
    ``gim``, GIM's rules (Edin et al. 2025: norms with frozen statistics, the attention softmax's backward at
    temperature 2, q/k/v gradients / 4, / 4, / 2, a gated MLP's gradient / 2); ``relp``, RelP's (Jafari et al.
    2025: the LN-, AH-, Identity- and Half-rules; queries and keys then get no gradient: every edge into a ``<q>``
    or ``<k>`` input scores 0). The forward is the model's own; see ``circuits.arch.rules``. ``exact`` takes no
    gradients: it refuses any backward but ``gradient``.

    ``checkpoint``: a file (see ``circuits.resume``) where the running score sum and the next batch are
    saved after every batch; calling again with the same path resumes at that batch and returns the
    identical tensor (the same sums in the same order). It belongs to this model (config and weights),
    task (content and metric), method and parameters: another call with the same path raises
    ``CircuitsError`` naming what differs. A finished checkpoint returns its scores at once.
    """
    check_choice("method", method, METHODS)
    check_backward(method, backward)
    check_choice("ablation", ablation, ABLATIONS)
    check_choice("level", level, LEVELS)
    check_batch_size(batch_size)
    parse_memory(max_memory)
    check_positive("ig_steps", ig_steps)
    check_gradient_metric(method, task.metric, ig_steps)
    if level == "mlp-neuron" and method in GRADIENT_METHODS and GRADIENT_METHODS[method].per_layer:
        raise CircuitsError(
            f"{method} interpolates the sources' outputs, not the MLPs' hidden units: use another method at level "
            f"'mlp-neuron' ({', '.join(name for name in METHODS if name != method)})"
        )
    resolution = resolution_of(model, task, level, positions)  # the task's spans checked before any batch runs
    plan = BatchPlan.of(batch_size, model.device, max_memory)  # lays the batches out; the checkpoint records them
    parameters = {"method": method, "ablation": ablation, "batch_size": plan.requested, "level": level}
    if resolution.spans is not None:
        parameters["spans"] = resolution.spans.to_dict()
    if method in GRADIENT_METHODS and GRADIENT_METHODS[method].uses_steps:
        parameters["ig_steps"] = ig_steps
    if method in GRADIENT_METHODS and GRADIENT_METHODS[method].per_layer:  # its name meant eap-ig-mask before:
        parameters["per_layer"] = True  # a checkpoint of that definition is refused, not resumed
    if method == "exact":
        parameters["max_tokens"] = MAX_TOKENS
    if backward != "gradient":  # absent for plain gradients: their checkpoints stay valid
        parameters["backward"] = backward
    resumable = open_checkpoint(checkpoint, model, task, parameters)
    start = time.perf_counter()
    if method == "exact":
        tensor = plan.run(
            lambda saved: exact_scores(
                model, task, ablation, plan, level, progress, checkpoint=saved, resolution=resolution
            ),
            resumable,
        )
    else:
        with backward_rules(model, backward):  # checks the model's norms and activations before any batch runs
            tensor = plan.run(
                lambda saved: gradient_scores(
                    model, task, method, ablation, plan, ig_steps, progress, saved, resolution
                ),
                resumable,
            )
        if level == "node":
            tensor = tensor.masked_fill(~model.graph.real, 0).sum(1)
    _check_finite(model, tensor, level, resolution.spans)
    meta = {
        "method": method,
        "ablation": ablation,
        "level": level,
        "task": task.name,
        "model": model.name,
        "n": len(task),
        "metric": task.metric if isinstance(task.metric, str) else "custom",
        "higher_is_better": task.higher_is_better,
        "seconds": time.perf_counter() - start,
    }
    if method in GRADIENT_METHODS and GRADIENT_METHODS[method].uses_steps:
        meta["ig_steps"] = ig_steps
    if backward != "gradient":
        meta["backward"] = backward
    return Scores(model.graph, tensor, level, meta, resolution.spans)


__all__ = [
    "ABLATIONS",
    "BACKWARDS",
    "LEVELS",
    "METHODS",
    "acdc",
    "attribute",
    "check_backward",
    "check_gradient_metric",
]


def check_backward(method: str, backward: str) -> None:
    """A CircuitsError unless ``backward`` is one of ``BACKWARDS`` and, when it modifies the backward pass,
    ``method`` takes gradients (the rules apply to the gradient methods only)."""
    check_choice("backward", backward, BACKWARDS)
    if backward != "gradient" and method not in GRADIENT_METHODS:
        raise CircuitsError(
            f"backward {backward!r} modifies gradients, and method {method!r} takes none; use backward='gradient' "
            f"with {method!r}, or one of the gradient methods {', '.join(GRADIENT_METHODS)}"
        )


def _check_finite(model: Model, scores: torch.Tensor, level: str, spans: Spans | None = None) -> None:
    """A NaN or infinite score is never returned: it names the first such unit (edge, node, neuron) instead."""
    bad = ~torch.isfinite(scores)
    if level == "edge":
        bad &= real_edges(model.graph, spans)
    if bad.any():
        name = unit_names(model.graph, level, spans, bad.nonzero()[:1])[0]
        raise CircuitsError(
            f"{int(bad.sum())} score(s) are not finite (NaN or infinite), the first for {name}: the model's "
            f"outputs or the metric overflowed in {model.dtype}; run in float32 or check the metric"
        )
