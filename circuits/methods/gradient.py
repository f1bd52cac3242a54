"""Attribution patching: first-order estimates of every edge's effect from gradients.

score(u->v) = sum over examples and positions of (patch_u - out_u) . mean_k dMetric/d in_v(point_k),
where out_u is u's clean output and the points are:

- ``eap``: the clean run (Syed et al. 2023);
- ``eap-ig-inputs``: the input embeddings at ablated + a (clean - ablated), a = k / steps,
  k = 0 ... steps - 1, starting at the ablated (corrupted) end: the EAP-IG / MIB points;
- ``eap-ig-activations``: integrated gradients over the edge mask: every edge at m = a
  (each destination reads a * out_u + (1 - a) * patch_u), a at the midpoints (k + 1/2) / steps,
  each point's gradient taken with that point's own deltas out_u(a) - patch_u; the scores then
  sum to metric(all ablated) - metric(clean) up to the quadrature error (completeness). With
  zero ablation on models with RMSNorm/LayerNorm the integrand diverges near m = 0 (every
  input shrinks to zero), so prefer patching or mean ablation for this method;
- ``clean-corrupted``: the clean run and the run on the ablated input, averaged.

Each gradient point is one forward and one backward; the gradients at each layer's destination
inputs are accumulated, then contracted with the deltas once per batch (per point for
``eap-ig-activations``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..choices import METRICS
from ..engine import PatchedOutput, patched_forward
from ..errors import CircuitsError
from ..model import Model
from ..resume import Checkpoint
from ..task import REFERENCE_METRICS, Task
from .common import Batch, batches, metric_sum, resumed_sum, save_sum

Point = tuple[float, float | None]  # (input interpolation a, every edge's mask value; None: the plain mask of ones)


@dataclass(frozen=True)
class GradientMethod:
    """What the engine needs to know about an attribution method: where it takes its gradients."""

    points: Callable[[int], list[Point]]  # the gradient points for a number of steps
    per_point: bool = False  # contract each point's gradients with that point's own deltas (else the clean ones)
    uses_steps: bool = False  # the number of steps changes the points

    def first_point_is_clean(self, steps: int) -> bool:
        """Is the first gradient point the clean run itself (so no separate clean forward is needed)?"""
        return self.points(steps)[0] == (1.0, None)


GRADIENT_METHODS: dict[str, GradientMethod] = {
    "eap": GradientMethod(lambda steps: [(1.0, None)]),
    "eap-ig-inputs": GradientMethod(lambda steps: [(k / steps, None) for k in range(steps)], uses_steps=True),
    "eap-ig-activations": GradientMethod(
        lambda steps: [(1.0, (k + 0.5) / steps) for k in range(steps)], per_point=True, uses_steps=True
    ),
    "clean-corrupted": GradientMethod(lambda steps: [(1.0, None), (0.0, None)]),
}


def clean_point_only(method: str, steps: int) -> bool:
    """Does ``method`` take its gradients at the clean run only (as ``eap`` does)?"""
    return method in GRADIENT_METHODS and GRADIENT_METHODS[method].points(steps) == [(1.0, None)]


def check_gradient_metric(method: str, metric: Any, steps: int) -> None:
    """A CircuitsError when ``method`` takes its gradients at the clean run only and ``metric`` compares with
    the clean run (``kl``, ``l2``): such a metric is at its minimum there, every gradient is zero, and the
    scores would be noise."""
    if not isinstance(metric, str) or metric not in REFERENCE_METRICS or not clean_point_only(method, steps):
        return
    others = [name for name in (*GRADIENT_METHODS, "exact") if not clean_point_only(name, steps)]
    answers = [name for name in METRICS if name not in REFERENCE_METRICS]
    raise CircuitsError(
        f"method {method!r} takes its gradients at the clean run only, where the {metric} metric is at its minimum "
        f"and every gradient is zero, so its scores would be noise; use {', '.join(others)} (an EAP-IG method "
        f"takes gradients away from the clean run), or a {' or '.join(answers)} metric"
    )


def gradient_scores(
    model: Model,
    task: Task,
    method: str,
    ablation: str,
    batch_size: int,
    ig_steps: int,
    progress: bool,
    checkpoint: Checkpoint | None = None,
) -> torch.Tensor:
    """The scores summed over the task's batches in order; with ``checkpoint``, the running sum and the next
    batch are saved after each batch and a saved sum is resumed from (the same sums in the same order)."""
    graph = model.graph
    scores, start = resumed_sum(checkpoint, torch.zeros(graph.n_src, graph.n_dst))
    for index, batch in enumerate(batches(model, task, ablation, batch_size, progress, start), start):
        scores += _batch_scores(model, task, batch, method, ig_steps)
        save_sum(checkpoint, scores, index + 1)
    return scores


def _batch_scores(model: Model, task: Task, batch: Batch, method: str, ig_steps: int) -> torch.Tensor:
    spec = GRADIENT_METHODS[method]
    graph, tokens = model.graph, batch.tokens
    ids, mask, positions = tokens.clean_ids, tokens.attention_mask, tokens.positions
    with torch.no_grad():
        clean_input = model.adapter.embed(ids, torch.arange(ids.shape[1], device=ids.device).expand_as(ids))
        ablated_input = torch.zeros_like(clean_input) if batch.patch is None else batch.patch[0].expand_as(clean_input)
        clean = None
        if not spec.first_point_is_clean(ig_steps):
            clean = patched_forward(model, ids, mask, keep_outputs=True, logit_positions=positions)

    gradients: dict[int, tuple[slice, torch.Tensor]] = {}

    def accumulate(destinations: slice, grad: torch.Tensor) -> None:
        if destinations.start in gradients:
            gradients[destinations.start][1].add_(grad)
        else:
            gradients[destinations.start] = (destinations, grad.clone())

    points = spec.points(ig_steps)
    per_point = spec.per_point
    scores = torch.zeros(graph.n_src, graph.n_dst)
    for alpha, mask_value in points:
        edge_mask = None
        if mask_value is not None:
            edge_mask = torch.full((graph.n_src, graph.n_dst), mask_value, dtype=model.dtype, device=model.device)
        embeddings = (ablated_input + alpha * (clean_input - ablated_input)).detach().requires_grad_(True)
        run = patched_forward(
            model,
            ids,
            mask,
            edge_mask,
            batch.patch,
            keep_outputs=per_point or clean is None,
            logit_positions=positions,
            grad_hook=accumulate,
            input_embeddings=embeddings,
        )
        if clean is None:  # this point is the clean run: its outputs and logits are the clean ones
            clean = PatchedOutput(run.logits.detach(), run.outputs.detach())
        value = metric_sum(task, run.logits, batch, clean.logits) / len(points)
        torch.autograd.grad(value, embeddings, allow_unused=True)
        if per_point:
            _contract(scores, _deltas(run.outputs.detach(), batch.patch), gradients, graph)
            gradients.clear()
    if not per_point:
        _contract(scores, _deltas(clean.outputs, batch.patch), gradients, graph)
    return scores


def _deltas(outputs: torch.Tensor, patch: torch.Tensor | None) -> torch.Tensor:
    """out_u - patch_u for every source."""
    return outputs if patch is None else outputs - patch


def _contract(scores: torch.Tensor, deltas: torch.Tensor, gradients: dict, graph) -> None:
    """scores[u, v] -= delta_u . grad_v, one matrix product per layer over the sources it reads."""
    flat_deltas = deltas.flatten(1).float()
    for destinations, grad in gradients.values():
        reads = int(graph.n_inputs[destinations.start])
        scores[:reads, destinations] -= (flat_deltas[:reads] @ grad.flatten(1).float().T).cpu()
