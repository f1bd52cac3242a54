"""Circuit discovery methods, all on the one engine: attribution patching, exact patching, ACDC."""

from __future__ import annotations

import time

from ..circuit import Scores
from ..model import Model
from ..task import Task
from .acdc import acdc
from .common import ABLATIONS, check_choice, check_positive
from .exact import exact_scores
from .gradient import GRADIENT_METHODS, gradient_scores

METHODS = (*GRADIENT_METHODS, "exact")
LEVELS = ("edge", "node")


def attribute(
    model: Model,
    task: Task,
    method: str = "eap-ig-inputs",
    ablation: str = "patching",
    batch_size: int = 32,
    ig_steps: int = 5,
    level: str = "edge",
    progress: bool = True,
) -> Scores:
    """Score every edge (or, with ``level="node"``, every source node) of the model's graph on a task.

    A score estimates mean metric(edge ablated) - mean metric(clean), the metric being the task's.
    Methods: ``eap``, ``eap-ig-inputs``, ``eap-ig-activations``, ``clean-corrupted`` (gradient
    estimates, see ``circuits.methods.gradient``) and ``exact`` (one patched forward per edge).
    Ablations: ``patching`` (the corrupted prompts' activations), ``mean`` (over the task's clean
    prompts), ``zero``. Memory is bounded by ``batch_size``; scores are returned on the CPU.
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
        "seconds": time.perf_counter() - start,
    }
    if "ig" in method:
        meta["ig_steps"] = ig_steps
    return Scores(model.graph, tensor, level, meta)


__all__ = ["ABLATIONS", "LEVELS", "METHODS", "acdc", "attribute"]
