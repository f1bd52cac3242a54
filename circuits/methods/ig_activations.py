"""``eap-ig-activations``: EAP-IG over activations, one layer at a time, as the EAP-IG library and MIB define it.

The sources are taken in groups, in forward order: the input, then for each layer its attention heads together
and its MLP (2 L + 1 groups). For every group G and every a = k / steps, k = 1 ... steps, one run takes the
clean prompts with G's outputs held at the constant

    c_G(a) = patch_G + a (clean_G - patch_G)

(every other source computes from what it reads, so the layers after G see the interpolated outputs; no
gradient passes through G), and the metric's gradient at every destination's input. Every edge's score is its
clean delta contracted with the gradients at its destination, averaged over all (2 L + 1) x steps runs:

    score(u->v) = sum over examples and positions of (patch_u - out_u) . mean over G, k of dMetric/d in_v(G, k / steps)

Reference: ``get_scores_ig_activations`` in the EAP-IG library (github.com/hannamw/EAP-IG, src/eap/attribute.py;
MIB's circuit track runs it as a submodule, commit 7af394a, with 5 steps): its node list is ``input`` and per
layer ``a{l}.h0`` (the hook of every head's result, so all heads of the layer at once) and ``m{l}``; each node's
output hook returns ``a * clean + (1 - a) * corrupted`` for a = step / steps, step = 1 ... steps (a constant: the
hook replaces the output); one backward per node and step with the gradient hooks of every destination, each
contracted with the fixed ``corrupted - clean`` activation differences; the sum divided by the number of examples
and by (nodes x steps). Two differences, both where the reference departs from its own deltas:

- ``mean`` ablation: the reference leaves its corrupted-activation buffer at zero, so it interpolates from 0 to
  the clean outputs while its deltas are ``mean - clean``; here every group runs from its ablation value to the
  clean outputs, the path its deltas measure (``patching`` and ``zero`` are the same in both).
- the ``input`` source is the whole input (token and learned position embeddings); the reference's ``input`` is
  TransformerLens' ``hook_embed``, the token embedding alone, which differs only under ``zero`` ablation (the
  positions are the same in a clean/corrupted pair).

Cost per batch: the ablation values, one clean forward (the deltas), and (2 L + 1) x steps forward/backwards of
as many examples. A group's steps run stacked (a few examples at all steps in one forward/backward of no more
rows than the batch, as ``eap-ig-inputs`` does), and every run contracts the one set of clean deltas, so each
example's gradients are summed over its steps, and over the groups (``_GroupSums``), before they are
contracted. The input group is the plain forward with interpolated embeddings; a later group is the engine's
patched forward with G's edges at mask 0 and its ablation values replaced by ``c_G(a)``: every destination
after G reads ``resid - out_G + c_G``, one stream for all of them (the engine's read for a mask constant along
each source's row: no per-destination copies), and the gradient through ``out_G`` cancels. Memory: the whole
ablation values (n_src x B x T x D), the clean deltas from the first differing position, and a run's held
values (n_src x B x T x D, only the held group's rows read), in the model's dtype; the gradient sums when they
fit in the deltas' memory.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from tqdm.auto import tqdm

from .. import distributed
from ..engine import patched_forward
from ..errors import CircuitsError
from ..graph import Graph
from ..model import Model
from ..task import Task
from .common import EDGES, Batch, Resolution, metric_sum
from .gradient import _Contraction, contraction_for, stacked_runs


def layer_groups(graph: Graph) -> list[slice]:
    """The groups of sources interpolated together, in forward order: the input, then per layer its heads, its MLP."""
    groups = [slice(0, 1)]
    for slots in graph.layers:
        groups += [slots.heads, slice(slots.mlp_source, slots.mlp_source + 1)]
    return groups


def layer_batch_scores(
    model: Model, task: Task, batch: Batch, ig_steps: int, progress: bool = False, resolution: Resolution = EDGES
) -> torch.Tensor:
    """One batch's ``eap-ig-activations`` scores ``[n_src, n_dst]`` (by span, or ``[n_src, d_model]`` per output
    dimension, at those ``resolution``s; on the CPU, float32); ``progress`` shows a bar over its
    forward/backwards (a batch takes (2L + 1) x ``ig_steps`` of them, stacked a few at a time)."""
    if batch.trimmed:
        raise CircuitsError("eap-ig-activations needs the whole ablation values (a batch made with trim=False)")
    graph, tokens, start = model.graph, batch.tokens, batch.start
    ids, attention_mask, positions = tokens.clean_ids, tokens.attention_mask, tokens.positions
    n_examples, seq = ids.shape
    alphas = [k / ig_steps for k in range(1, ig_steps + 1)]
    groups = layer_groups(graph)
    n_points = len(groups) * len(alphas)
    contraction = contraction_for(model, batch, (n_examples, seq), resolution, _GroupSums)
    with torch.no_grad():  # the clean run: the deltas clean - patch (from ``start`` on) and the clean logits
        clean_logits = patched_forward(
            model, ids, attention_mask, logit_positions=positions, source_hook=contraction.record
        ).logits
        clean_input = model.adapter.embed(ids, torch.arange(seq, device=ids.device).expand_as(ids))
    runs = stacked_runs(n_examples, len(alphas))
    most_rows = max((examples.stop - examples.start) * len(ks) for examples, ks in runs)
    held = torch.zeros(
        (graph.n_src, most_rows, seq, model.adapter.d_model), dtype=model.dtype, device=model.device
    )  # the ablation values of a run: its group's rows hold c_G(a) for each stacked step; the others are unread
    shown = progress and distributed.is_main()
    bar = tqdm(desc="layer groups", total=len(runs) * len(groups), disable=not shown, leave=False)
    for examples, ks in runs:
        count, repeat = examples.stop - examples.start, len(ks)
        rows = count * repeat
        contraction.begin(examples, repeat, None)
        run_batch = replace(batch, tokens=tokens.rows(examples))
        for group in groups:
            _hold(held, group, examples, [alphas[k] for k in ks], batch.patch, contraction.deltas, start)
            if group.start == 0:  # the input: the plain forward from interpolated embeddings
                embeddings, edge_mask, patch = held[0, :rows].clone(), None, None
            else:  # G's edges at mask 0 read c_G(a) in place of G's outputs
                embeddings = clean_input[examples].repeat(repeat, 1, 1)
                edge_mask = torch.ones(graph.n_src, graph.n_dst, dtype=model.dtype, device=model.device)
                edge_mask[group] = 0
                patch = held[:, :rows]
            embeddings.requires_grad_(True)
            run = patched_forward(
                model,
                ids[examples].repeat(repeat, 1),
                attention_mask[examples].repeat(repeat, 1),
                edge_mask,
                patch,
                logit_positions=None if positions is None else positions[examples].repeat(repeat),
                grad_hook=contraction.contract,
                input_embeddings=embeddings,
                grad_from=start,
            )
            logits = run.logits.unflatten(0, (repeat, -1))  # [steps of this run, examples, ...]
            value = sum(metric_sum(task, step_logits, run_batch, clean_logits[examples]) for step_logits in logits)
            torch.autograd.grad(value / n_points, embeddings, allow_unused=True)
            bar.update(1)
        contraction.flush()
    bar.close()
    return contraction.scores.cpu()


class _GroupSums(_Contraction):
    """The contraction with each destination's gradients summed over the runs of one set of examples (every
    group's, every step's) and contracted once when they are flushed: one contraction per example, as
    ``eap-ig-inputs`` makes, instead of one per group (a contraction of every source with every destination
    costs, per example, about a third of a forward/backward of SmolLM2-135M, and there are 2 L + 1 groups). The
    sums, ``[n_dst, examples x (T - start) x D]`` in float32, are kept only when they take no more memory than
    the deltas; otherwise each run's gradients are contracted as they come, as ``_Contraction`` does."""

    def begin(self, examples: slice, repeat: int, recorded: int | None) -> None:
        super().begin(examples, repeat, recorded)
        columns = (examples.stop - examples.start) * self.deltas.shape[2] * self.deltas.shape[3]
        self.summing = self.graph.n_dst * columns * 4 <= self.deltas.numel() * self.deltas.element_size()
        self.sums: torch.Tensor | None = None
        self.seen: dict[int, slice] = {}  # the destinations the sums hold, by first index, in arrival order

    def contract(self, destinations: slice, grad: torch.Tensor) -> None:
        if not self.summing:
            super().contract(destinations, grad)
            return
        grad = grad.to(self.deltas.device)  # [n, repeat * examples, T - start, D]
        if self.repeat > 1:
            grad = grad.unflatten(1, (self.repeat, -1)).sum(1, dtype=torch.float32)
        grad = grad.flatten(1).float()
        if self.sums is None:
            self.sums = torch.zeros(self.graph.n_dst, grad.shape[1], dtype=torch.float32, device=grad.device)
        self.seen.setdefault(destinations.start, destinations)
        self.sums[destinations] += grad

    def flush(self) -> None:
        if self.sums is not None:  # hand the sums to the plain contraction, a few layers at a time
            sums, self.sums, self.repeat = self.sums, None, 1
            for destinations in self.seen.values():
                super().contract(destinations, sums[destinations])
            self.seen = {}
        super().flush()


def _hold(
    held: torch.Tensor,
    group: slice,
    examples: slice,
    alphas: list[float],
    patch: torch.Tensor | None,
    deltas: torch.Tensor,
    start: int,
) -> None:
    """Write ``c_G(a) = patch_G + a (clean_G - patch_G)`` of ``examples`` for each ``a`` into ``held``'s rows of
    ``group``, one block of rows per ``a``. ``deltas`` are ``clean - patch`` from position ``start`` on (before
    it, in a causal model under patching, the clean and ablated outputs are the same)."""
    count = examples.stop - examples.start
    base = None if patch is None else patch[group]
    if base is not None and base.shape[1] > 1:
        base = base[:, examples]
    for j, alpha in enumerate(alphas):
        block = held[group, j * count : (j + 1) * count]
        if base is None:
            block.zero_()
        else:
            block.copy_(base.expand_as(block))
        block[:, :, start:].add_(deltas[group, examples], alpha=alpha)
