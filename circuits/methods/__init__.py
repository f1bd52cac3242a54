"""Circuit discovery methods, all on the one engine: attribution patching, exact patching, ACDC."""

from __future__ import annotations

import time

from ..choices import ABLATIONS, LEVELS, METHODS, Ablation, Level, Method, check_choice, check_positive
from ..circuit import Scores
from ..errors import CircuitsError
from ..model import Model
from ..task import Task
from .acdc import acdc
from .exact import exact_scores
from .gradient import GRADIENT_METHODS, gradient_scores

if set(METHODS) != {*GRADIENT_METHODS, "exact"}:
    raise CircuitsError(f"circuits.choices.METHODS {METHODS} and the registered methods disagree")


def attribute(
    model: Model,
    task: Task,
    method: Method = "eap-ig-inputs",
    ablation: Ablation = "patching",
    batch_size: int = 32,
    ig_steps: int = 5,
    level: Level = "edge",
    progress: bool = True,
) -> Scores:
    """Score every edge (or, with ``level="node"``, every source node) of the model's graph on a task.

    A score estimates mean metric(edge ablated) - mean metric(clean), the metric being the task's.
    ``method`` is one of ``circuits.choices.METHODS``: ``exact`` runs one patched forward per edge,
    the others are the gradient estimates of ``circuits.methods.gradient``. ``ablation`` is one of
    ``ABLATIONS``: ``patching`` (the corrupted prompts' activations), ``mean`` (over the task's clean
    prompts) or ``zero``. Memory is bounded by ``batch_size``; scores are returned on the CPU.
    """
    check_choice("method", method, METHODS)
    check_choice("ablation", ablation, ABLATIONS)
    check_choice("level", level, LEVELS)
    check_positive("batch_size", batch_size)
    check_positive("ig_steps", ig_steps)
    start = time.perf_counter()
    if method == "exact":
        tensor = exact_scores(model, task, ablation, batch_size, level, progress)
    else:
        tensor = gradient_scores(model, task, method, ablation, batch_size, ig_steps, progress)
        if level == "node":
            tensor = tensor.masked_fill(~model.graph.real, 0).sum(1)
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
    return Scores(model.graph, tensor, level, meta)


__all__ = ["ABLATIONS", "LEVELS", "METHODS", "acdc", "attribute"]
