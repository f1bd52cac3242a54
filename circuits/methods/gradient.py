"""Attribution patching: first-order estimates of every edge's effect from gradients.

score(u->v) = sum over examples and positions of (patch_u - out_u) . mean_k dMetric/d in_v(point_k),
where out_u is u's clean output and the points are:

- ``eap``: the clean run (Syed et al. 2023);
- ``eap-ig-inputs``: the input embeddings at ablated + a (clean - ablated), a = k / steps,
  k = 0 ... steps - 1, starting at the ablated (corrupted) end: the EAP-IG / MIB points;
- ``eap-ig-mask``: integrated gradients over the edge mask (AutoCircuit's mask gradients, integrated): every
  edge at m = a (each destination reads a * out_u + (1 - a) * patch_u), a at the midpoints (k + 1/2) / steps,
  each point's gradient taken with that point's own deltas out_u(a) - patch_u; the scores then
  sum to metric(all ablated) - metric(clean) up to the quadrature error (completeness). With
  zero ablation on models with RMSNorm/LayerNorm the integrand diverges near m = 0 (every
  input shrinks to zero), so prefer patching or mean ablation for this method;
- ``eap-ig-activations``: EAP-IG over activations as the EAP-IG library and MIB define it: one layer's
  outputs at a time (the input, each layer's heads, each layer's MLP) held at ablated + a (clean - ablated),
  a = k / steps, k = 1 ... steps, the gradients averaged over every layer and step and contracted with the
  clean deltas; its own loop over the layers, ``circuits.methods.ig_activations``;
- ``clean-corrupted``: the clean run and the run on the ablated input, averaged.

Each gradient point is one forward and one backward. A method whose points all use the clean deltas
(``eap-ig-inputs``, ``clean-corrupted``) runs a few examples at all its points in one forward/backward of
no more rows than the batch, and sums each example's gradients over its points before contracting them: the
contraction, as costly as a third of a forward/backward on a small model, is done once per example rather
than once per point. The deltas are recorded as the sources are computed
(of the clean run, or of each point's own run for ``eap-ig-mask``), and the destination-input
gradients are contracted with them a few layers at a time as the backward delivers them: the contraction is
linear in the gradient, so contracting every point's gradient equals contracting their sum, and no more
than a few layers' gradients are held. With ``patching`` ablation in a causal model the positions every pair
of a batch shares are left out of the deltas, the gradients and the contraction: every delta is exactly zero
there (and the corrupted run keeps its outputs from the first differing position on only).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import torch

from ..batching import BatchPlan, BatchSize
from ..choices import METRICS
from ..engine import hidden_units, mlp_width, patched_forward
from ..errors import CircuitsError
from ..model import Model
from ..resume import Checkpoint
from ..task import REFERENCE_METRICS, Task
from .common import EDGES, Batch, Resolution, batch_results, metric_sum, resumed_sum, save_sum

Point = tuple[float, float | None]  # (input interpolation a, every edge's mask value; None: the plain mask of ones)
CLEAN: Point = (1.0, None)  # the clean run


@dataclass(frozen=True)
class GradientMethod:
    """What the engine needs to know about an attribution method: where it takes its gradients."""

    points: Callable[[int], list[Point]]  # the gradient points for a number of steps
    per_point: bool = False  # contract each point's gradients with that point's own deltas (else the clean ones)
    uses_steps: bool = False  # the number of steps changes the points
    per_layer: bool = False  # the points again for every layer's outputs interpolated (circuits.methods.ig_activations)


GRADIENT_METHODS: dict[str, GradientMethod] = {
    "eap": GradientMethod(lambda steps: [CLEAN]),
    "eap-ig-inputs": GradientMethod(lambda steps: [(k / steps, None) for k in range(steps)], uses_steps=True),
    "eap-ig-mask": GradientMethod(
        lambda steps: [(1.0, (k + 0.5) / steps) for k in range(steps)], per_point=True, uses_steps=True
    ),
    "eap-ig-activations": GradientMethod(  # the input group's points; the layers' groups repeat them
        lambda steps: [(k / steps, None) for k in range(1, steps + 1)], uses_steps=True, per_layer=True
    ),
    "clean-corrupted": GradientMethod(lambda steps: [CLEAN, (0.0, None)]),
}


def clean_point_only(method: str, steps: int) -> bool:
    """Does ``method`` take its gradients at the clean run only (as ``eap`` does)?"""
    return method in GRADIENT_METHODS and GRADIENT_METHODS[method].points(steps) == [CLEAN]


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
    batch_size: BatchSize | BatchPlan,
    ig_steps: int,
    progress: bool,
    checkpoint: Checkpoint | None = None,
    resolution: Resolution = EDGES,
) -> torch.Tensor:
    """The scores summed over the task's batches in order; with ``checkpoint``, the running sum and the next
    batch are saved after each batch and a saved sum is resumed from (the same sums in the same order).
    ``resolution``: edges (by span or not), the sources' output dimensions or the MLPs' hidden units; node scores
    are the edge scores, summed by the caller."""
    spec = GRADIENT_METHODS[method]
    trim = not spec.per_layer and not any(mask is not None for _, mask in spec.points(ig_steps))  # no forward reads it
    if resolution.level == "node":
        resolution = EDGES
    scores, start = resumed_sum(checkpoint, torch.zeros(resolution.shape(model)))
    plan = BatchPlan.of(batch_size, model.device)
    compute = partial(
        _batch_scores, model, task, method=method, ig_steps=ig_steps, progress=progress, resolution=resolution
    )
    hidden = resolution.level == "mlp-neuron"
    for index, batch_scores in batch_results(model, task, ablation, plan, compute, progress, start, trim, hidden):
        scores += batch_scores.float()
        save_sum(checkpoint, scores, index + 1)
    return scores


def _batch_scores(
    model: Model,
    task: Task,
    batch: Batch,
    method: str,
    ig_steps: int,
    progress: bool = False,
    resolution: Resolution = EDGES,
) -> torch.Tensor:
    """One batch's scores. The positions before ``batch.start`` (which every pair shares) are left out; a
    trimmed patch is used up: the deltas are written over it.

    A method whose points all contract with the clean deltas runs its points stacked: each forward/backward
    takes a few examples at every point (no more rows than the batch), and each example's gradients are summed
    over its points before one contraction, so the deltas are contracted once per example instead of once per
    point. A method with per-point deltas runs one point over the whole batch at a time.
    """
    spec = GRADIENT_METHODS[method]
    if spec.per_layer:  # a loop over the layers of its own
        from .ig_activations import layer_batch_scores  # it builds on this module's contraction

        return layer_batch_scores(model, task, batch, ig_steps, progress, resolution)
    tokens, points = batch.tokens, spec.points(ig_steps)
    ids = tokens.clean_ids
    with torch.no_grad():
        clean_input = model.adapter.embed(ids, torch.arange(ids.shape[1], device=ids.device).expand_as(ids))
        if batch.patch is None:
            ablated_input = torch.zeros_like(clean_input)
        elif batch.trimmed:  # the corrupted embeddings from ``start`` on; the clean ones before
            ablated_input = clean_input.clone()
            ablated_input[:, batch.start :] = batch.patch[0]
        else:
            ablated_input = batch.patch[0].expand_as(clean_input).clone()
    contraction = contraction_for(model, batch, tuple(ids.shape), resolution)
    with contraction.hooks():
        _run_points(model, task, batch, spec, points, clean_input, ablated_input, contraction)
    return contraction.scores.cpu()


def _run_points(
    model: Model,
    task: Task,
    batch: Batch,
    spec: GradientMethod,
    points: list[Point],
    clean_input: torch.Tensor,
    ablated_input: torch.Tensor,
    contraction: _Contraction,
) -> None:
    """Every gradient point's forward/backward of one batch, the gradients handed to ``contraction``."""
    tokens = batch.tokens
    ids = tokens.clean_ids
    clean = points.index(CLEAN) if CLEAN in points else None  # a point whose run records the clean deltas
    needs_clean_logits = isinstance(task.metric, str) and task.metric in REFERENCE_METRICS
    clean_logits = None
    if clean is None and (needs_clean_logits or not spec.per_point):  # the clean logits, or deltas, first
        with torch.no_grad():
            record = None if spec.per_point else contraction.record
            clean_logits = patched_forward(
                model, ids, tokens.attention_mask, logit_positions=tokens.positions, source_hook=record
            ).logits

    runs = [(slice(0, len(ids)), [k]) for k in range(len(points))] if spec.per_point else None
    for examples, indices in runs or stacked_runs(len(ids), len(points), clean):
        run_points = [points[k] for k in indices]
        repeat, mask_value = len(run_points), run_points[0][1]  # a masked method runs one point at a time
        edge_mask = None
        if mask_value is not None:
            edge_mask = torch.full(
                (model.graph.n_src, model.graph.n_dst), mask_value, dtype=model.dtype, device=model.device
            )
        clean_part, ablated_part = clean_input[examples], ablated_input[examples]
        embeddings = torch.cat([ablated_part + alpha * (clean_part - ablated_part) for alpha, _ in run_points])
        embeddings = embeddings.detach().requires_grad_(True)
        recorded = 0 if spec.per_point else indices.index(clean) if clean in indices else None
        contraction.begin(examples, repeat, recorded)
        run = patched_forward(
            model,
            ids[examples].repeat(repeat, 1),
            tokens.attention_mask[examples].repeat(repeat, 1),
            edge_mask,
            None if edge_mask is None else batch.patch,
            logit_positions=None if tokens.positions is None else tokens.positions[examples].repeat(repeat),
            grad_hook=contraction.contract,
            input_embeddings=embeddings,
            source_hook=None if recorded is None else contraction.record,
            grad_from=batch.start,
        )
        logits = run.logits.unflatten(0, (repeat, -1))  # [points of this run, examples, ...]
        if clean in indices:  # the examples' clean logits, for this run's metric and their later runs'
            if clean_logits is None:
                clean_logits = torch.empty((len(ids), *logits.shape[2:]), dtype=logits.dtype, device=logits.device)
            clean_logits[examples] = logits[indices.index(clean)].detach()
        run_clean_logits = None if clean_logits is None else clean_logits[examples]
        run_batch = replace(batch, tokens=tokens.rows(examples))
        value = sum(metric_sum(task, point_logits, run_batch, run_clean_logits) for point_logits in logits)
        torch.autograd.grad(value / len(points), embeddings, allow_unused=True)
        contraction.flush()  # before the next run records its own deltas


def stacked_runs(n_examples: int, n_points: int, first: int | None = None) -> list[tuple[slice, list[int]]]:
    """(examples, point indices) per run: every example at every point, no run with more rows (examples times
    points) than ``n_examples``, the examples split evenly, and point ``first`` in an example's first run."""
    order = sorted(range(n_points), key=lambda k: k != first)
    if n_examples < n_points:  # one example at a time, its points in groups
        groups = [order[k : k + n_examples] for k in range(0, n_points, n_examples)]
        return [(slice(e, e + 1), group) for e in range(n_examples) for group in groups]
    per_run = n_examples // n_points
    parts = torch.arange(n_examples).tensor_split(-(-n_examples // per_run))
    return [(slice(int(part[0]), int(part[-1]) + 1), order) for part in parts]


def contraction_for(
    model: Model, batch: Batch, shape: tuple[int, int], resolution: Resolution, kind: type | None = None
) -> _Contraction:
    """The contraction that turns one batch's gradients into scores at ``resolution`` (``kind``: a subclass of
    ``_Contraction`` to use for the edge and neuron levels)."""
    if resolution.level == "mlp-neuron":
        return _HiddenContraction(model, batch, shape)
    return (kind or _Contraction)(model, batch, shape, resolution)


class _Contraction:
    """One batch's deltas ``out_u - patch_u`` from position ``batch.start`` on, recorded as a forward computes
    the sources, and the scores ``scores[u, v] -= delta_u . grad_v`` they give as the gradients arrive.

    The deltas are ``[n_src, B, T - start, D]`` in the model's dtype on its device (a trimmed patch's own
    memory: source u's deltas replace its corrupted outputs); the scores accumulate there in float32. The
    backward delivers one layer's gradients at a time; they are kept until they take a ``PENDING_SHARE`` of
    the deltas' memory and then contracted together, so that the deltas are read once per few layers rather
    than once per layer (reading them, not multiplying, is what the contraction's time goes to).

    By span (``resolution.spans``) the products are taken over each span's positions apart: ``scores[u, v, s]``.
    At the ``neuron`` level the scores are per output dimension, ``scores[u, d] -=
    sum over positions of delta_u[d] * sum_v grad_v[d]`` over the destinations v reading u: the destinations
    arrive last layer first and read ever fewer sources, so a running sum of their gradients is, when a group
    that no longer reads sources r.. arrives, the gradient those sources' outputs get.
    """

    def __init__(
        self,
        model: Model,
        batch: Batch,
        shape: tuple[int, int],
        resolution: Resolution = EDGES,
    ):
        n_batch, seq = shape
        self.graph, self.start = model.graph, batch.start
        self.trimmed, self.patch = batch.trimmed, batch.patch
        if batch.trimmed:
            self.deltas = batch.patch
        else:
            deltas_shape = (self.graph.n_src, n_batch, seq - self.start, model.adapter.d_model)
            self.deltas = torch.empty(deltas_shape, dtype=model.dtype, device=model.device)
        self.spans = resolution.batch_spans(batch.tokens, batch.start)  # [B, T - start] each position's span
        self.neurons = resolution.level == "neuron"
        self.scores = torch.zeros(resolution.shape(model), dtype=torch.float32, device=model.device)
        self.pending: list[tuple[slice, torch.Tensor]] = []  # (destinations, gradients [n, K] in float32)
        self.pending_columns = 0
        # destinations kept before contracting: float32 gradients of at most PENDING_SHARE of the deltas' bytes
        self.pending_limit = max(1, int(PENDING_SHARE * self.graph.n_src * self.deltas.element_size() / 4))
        self.begin(slice(0, n_batch), 1, 0)

    @contextlib.contextmanager
    def hooks(self):
        """What the runs need installed while they go (nothing: the engine's hooks deliver everything)."""
        yield

    def begin(self, examples: slice, repeat: int, recorded: int | None) -> None:
        """The next run stacks ``repeat`` copies of ``examples``; its copy number ``recorded`` (if any) records
        their deltas; each example's gradients are summed over the copies before they are contracted."""
        self.examples, self.repeat, self.recorded = examples, repeat, recorded
        self.running: torch.Tensor | None = None  # neurons: the gradients of the destinations so far, summed
        self.boundary = self.graph.n_src  # neurons: sources from here on are contracted

    def record(self, first: int, outputs: torch.Tensor) -> None:
        rows = self.deltas[first : first + len(outputs), self.examples]
        outputs = outputs.unflatten(1, (self.repeat, -1))[:, self.recorded, :, self.start :].to(rows.device)
        if self.trimmed:  # the rows hold these sources' corrupted outputs: they become the deltas
            torch.sub(outputs, rows, out=rows)
        elif self.patch is None:  # zero ablation
            rows.copy_(outputs)
        else:
            patch = self.patch[first : first + len(outputs)]
            if patch.shape[2] > 1:
                patch = patch[:, self.examples if patch.shape[1] > 1 else slice(None), self.start :]
            torch.sub(outputs, patch, out=rows)

    def contract(self, destinations: slice, grad: torch.Tensor) -> None:
        grad = grad.to(self.deltas.device)  # [n, repeat * examples, T - start, D]: positions start on
        if self.repeat > 1:
            grad = grad.unflatten(1, (self.repeat, -1)).sum(1, dtype=torch.float32)
        grad = grad.flatten(1).float()  # [n, K]
        if self.neurons:
            self._neuron_step(int(self.graph.n_inputs[destinations.start]), grad.sum(0))
            return
        self.pending.append((destinations, grad))
        self.pending_columns += len(grad)
        if self.pending_columns >= self.pending_limit:
            self.flush()

    def flush(self) -> None:
        """Contract the pending gradients with the deltas of every source any of them reads."""
        if self.neurons:
            if self.running is not None:
                self._neuron_step(0, None)
            self.running, self.boundary = None, self.graph.n_src
            return
        if not self.pending:
            return
        reads = [int(self.graph.n_inputs[destinations.start]) for destinations, _ in self.pending]
        gradients = torch.cat([grad for _, grad in self.pending]) if len(self.pending) > 1 else self.pending[0][1]
        deltas = self.deltas[: max(reads), self.examples].flatten(1)
        if self.spans is None:
            self._subtract(_products(gradients, deltas), None, reads)
        else:  # each span's positions apart
            d_model = self.deltas.shape[-1]
            gradients, deltas = gradients.view(len(gradients), -1, d_model), deltas.view(len(deltas), -1, d_model)
            spans = self.spans[self.examples].flatten()
            for span in spans.unique().tolist():
                where = (spans == span).nonzero().flatten()
                products = _products(gradients.index_select(1, where).flatten(1), deltas.index_select(1, where))
                self._subtract(products, span, reads)
        self.pending.clear()
        self.pending_columns = 0

    def _subtract(self, products: torch.Tensor, span: int | None, reads: list[int]) -> None:
        """``scores[u, v(, span)] -= products[v, u]`` for the pending destinations and the sources they read."""
        scores = self.scores if span is None else self.scores[..., span]
        row = 0
        for (destinations, grad), n_reads in zip(self.pending, reads, strict=True):
            scores[:n_reads, destinations] -= products[row : row + len(grad), :n_reads].T
            row += len(grad)

    def _neuron_step(self, reads: int, summed: torch.Tensor | None) -> None:
        """Sources ``reads`` up to the boundary are read by no destination still to come: contract their deltas
        with the running sum, then add ``summed`` (a destination group reading ``reads`` sources) to it."""
        if reads > self.boundary:  # a new backward begins (runs contracted as they come): finish the last one
            self._neuron_step(0, None)
            self.running, self.boundary = None, self.graph.n_src
        if reads < self.boundary and self.running is not None:
            rows = self.deltas[reads : self.boundary, self.examples].flatten(1)
            d_model = self.deltas.shape[-1]
            for first in range(0, len(rows), CONTRACTION_ROWS):
                chunk = rows[first : first + CONTRACTION_ROWS].float() * self.running
                self.scores[reads + first : reads + first + len(chunk)] -= chunk.view(len(chunk), -1, d_model).sum(1)
        self.boundary = min(self.boundary, reads)
        if summed is not None:
            self.running = summed if self.running is None else self.running + summed


def _products(gradients: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
    """``gradients [n, K] @ deltas [k, K]^T`` in float32 (``[n, k]``), the deltas widened a few rows at a time when
    the model runs in lower precision."""
    deltas = deltas.flatten(1)
    step = len(deltas) if deltas.dtype == torch.float32 else CONTRACTION_ROWS
    return torch.cat([gradients @ rows.float().T for rows in deltas.split(step)], 1)


class _HiddenContraction(_Contraction):
    """The ``mlp-neuron`` level: scores ``[n_layers, d_mlp]``, ``scores[l, j] -= sum over positions of
    (h - h_patch)[j] * dMetric/dh[j]`` for every MLP hidden unit, from the hidden units a recording run sees
    (``circuits.engine.hidden_units``) and their gradients in every run."""

    def __init__(self, model: Model, batch: Batch, shape: tuple[int, int]):
        n_batch, seq = shape
        self.model, self.graph, self.start = model, model.graph, batch.start
        self.trimmed, self.patch, self.hidden_patch = False, None, batch.hidden_patch
        deltas_shape = (model.adapter.n_layers, n_batch, seq - self.start, mlp_width(model))
        self.deltas = torch.empty(deltas_shape, dtype=model.dtype, device=model.device)
        self.scores = torch.zeros(self.deltas.shape[0], self.deltas.shape[-1], dtype=torch.float32, device=model.device)
        self.begin(slice(0, n_batch), 1, 0)

    @contextlib.contextmanager
    def hooks(self):
        with hidden_units(self.model, self._see):
            yield

    def record(self, first: int, outputs: torch.Tensor) -> None:
        pass  # the sources' outputs are not what this level contracts: the hidden units are (``_see``)

    def _see(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """Record a recording run's hidden units of ``layer`` (minus their ablation values) and hook their gradient."""
        values = hidden.reshape(self.repeat, -1, *hidden.shape[-2:])  # [copies, examples, T, d_mlp]
        if self.recorded is not None:
            rows = self.deltas[layer, self.examples]
            clean = values[self.recorded, :, self.start :].detach().to(rows.device)
            patch = self.hidden_patch
            if patch is None:
                rows.copy_(clean)
            else:
                patch = patch[layer]
                if patch.shape[1] > 1:
                    patch = patch[self.examples if patch.shape[0] > 1 else slice(None), self.start :]
                torch.sub(clean, patch, out=rows)
        if hidden.requires_grad:
            hidden.register_hook(partial(self._hidden_gradient, layer))
        return hidden

    def _hidden_gradient(self, layer: int, grad: torch.Tensor) -> None:
        grad = grad.reshape(self.repeat, -1, *grad.shape[-2:])[:, :, self.start :].sum(0, dtype=torch.float32)
        deltas = self.deltas[layer, self.examples].float()
        self.scores[layer] -= (deltas * grad.to(deltas.device)).sum((0, 1))

    def contract(self, destinations: slice, grad: torch.Tensor) -> None:
        pass  # the destinations' gradients are not needed: the hidden units' are hooked where they are computed

    def flush(self) -> None:
        pass


PENDING_SHARE = 0.25  # gradients kept before a contraction, as a share of the deltas' memory
CONTRACTION_ROWS = 16  # sources widened to float32 at a time when the model runs in lower precision
