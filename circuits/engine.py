"""The patched forward: the one place where intervention logic lives.

Every destination v reads

    in_v = const + sum_u [ m_uv * out_u + (1 - m_uv) * patch_u ]
         = resid - sum_u (1 - m_uv) * (out_u - patch_u)

where ``resid`` is the stream the unmodified layer would read. The engine
keeps the sources' deltas ``out_u - patch_u`` in per-layer chunks and
materialises one layer's per-destination inputs at a time as a matrix
product over the sources that precede that layer. With the mask all ones it
runs the plain model's computation (no per-destination copies).
"""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from functools import partial
from typing import TYPE_CHECKING

import torch

from .arch import Adapter, Context
from .arch.base import map_rotary
from .arch.norms import norm_input_gradients
from .arch.rules import frozen_norm_input_gradients
from .errors import CircuitsError
from .graph import LayerSlots
from .placement import move_context

if TYPE_CHECKING:
    from .model import Model
    from .task import TokenizedTask

GradHook = Callable[[slice, torch.Tensor], None]
SourceHook = Callable[[int, torch.Tensor], None]


@dataclass
class PatchedOutput:
    """What a patched forward returns."""

    logits: torch.Tensor  # [B, T, V], or [B, V] at the requested logit positions
    outputs: torch.Tensor | None = None  # source outputs [n_src, B, T, D] when asked for


def patched_forward(
    model: Model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    edge_mask: torch.Tensor | None = None,
    patch: torch.Tensor | None = None,
    *,
    keep_outputs: bool = False,
    logit_positions: torch.Tensor | None = None,
    grad_hook: GradHook | None = None,
    input_embeddings: torch.Tensor | None = None,
    source_hook: SourceHook | None = None,
    grad_from: int = 0,
    spans: torch.Tensor | None = None,
    neuron_mask: torch.Tensor | None = None,
    hidden_mask: torch.Tensor | None = None,
    hidden_patch: torch.Tensor | None = None,
) -> PatchedOutput:
    """Run the model with every edge ``u->v`` weighted by ``edge_mask[u, v]``.

    Args:
        input_ids, attention_mask: ``[B, T]``, right-padded (tensors, or nested lists or numpy arrays,
            which become long tensors on the model's device).
        edge_mask: float ``[n_src, n_dst]`` (may require grad); None means all ones.
        patch: ablation values broadcastable to ``[n_src, B, T, D]`` (the corrupted run's
            ``outputs``, a mean, ...); None means zero ablation.
        keep_outputs: also return every source's output ``[n_src, B, T, D]``.
        logit_positions: ``[B]`` positions whose logits to compute (saves the unembedding).
        grad_hook: called during backward as ``grad_hook(destinations, grad)`` with the
            gradient ``[n, B, T, D]`` of the inputs of each layer's destinations
            (``destinations`` is a slice of the graph's destination indices).
        input_embeddings: ``[B, T, D]`` to use as the ``input`` source's output instead of
            embedding ``input_ids`` (integrated gradients interpolate it).
        source_hook: called as ``source_hook(first, outputs)`` with each group of sources' outputs
            ``[n, B, T, D]`` (detached; ``first`` is the index of the first) as soon as they are computed,
            in forward order: a caller can keep what it needs of them instead of all of them.
        grad_from: the grad hook receives gradients at positions ``grad_from`` onward only,
            ``[n, B, T - grad_from, D]`` (a caller that needs no gradient before it saves their memory).
        spans: ``[B, T]`` span index of every position, for an edge mask resolved by span, ``[n_src, n_dst, S]``:
            destination v reads ``resid - sum_u (1 - m[u, v, s]) delta_u`` at a position of span s (``circuits.spans``).
        neuron_mask: ``[n_src, D]``, each source's output dimensions: source u writes
            ``patch_u + m_u * (out_u - patch_u)`` to every reader (no edge mask with it).
        hidden_mask, hidden_patch: ``[n_layers, d_mlp]`` and ``[n_layers, B or 1, T or 1, d_mlp]`` (None: zero),
            each MLP's hidden units: unit j of layer l reads ``patch + m[l, j] * (h - patch)`` (``hidden_units``).

    With a grad hook and a mask of ones (or any constant mask) every destination of a layer reads the
    same stream: it is not copied per destination; each head's q/k/v projection reads its own stride-0 view
    of the normed stream, so that the backward can give each destination its own gradient.
    """
    removal = None if edge_mask is None else check_edge_mask(model, edge_mask, spans, input_ids)
    if removal is not None and not removal.requires_grad and not removal.any():
        removal = None  # a constant mask of ones: the plain computation
    if neuron_mask is not None and edge_mask is not None:
        raise CircuitsError("a neuron mask ablates sources for every reader; pass it without an edge mask")
    neuron_removal = None if neuron_mask is None else check_neuron_mask(model, neuron_mask)
    run = _Run.start(
        model,
        input_ids,
        attention_mask,
        removal,
        patch,
        keep_outputs,
        grad_hook,
        input_embeddings,
        source_hook,
        spans,
        neuron_removal,
    )
    run.grad_from = grad_from
    hidden = contextlib.nullcontext()
    if hidden_mask is not None:
        removal = check_hidden_mask(model, hidden_mask)
        if hidden_patch is not None:
            check_hidden_patch(model, hidden_patch, *run.resid.shape[:2], removal.shape[1])
        hidden = hidden_units(model, partial(_mask_hidden, removal, hidden_patch))
    with hidden:
        for slots in model.graph.layers:
            run.layer(slots)
    return PatchedOutput(run.logits(logit_positions), torch.cat(run.outputs) if keep_outputs else None)


class _Run:
    """One patched forward, layer by layer (so that a run can also resume from a cached prefix)."""

    def __init__(
        self,
        model: Model,
        ctx: Context,
        resid: torch.Tensor,
        deltas: _Deltas | None,
        keep_outputs: bool = False,
        grad_hook: GradHook | None = None,
        source_hook: SourceHook | None = None,
    ):
        self.model, self.adapter, self.graph = model, model.adapter, model.graph
        self.ctx, self.resid, self.deltas = ctx, resid, deltas
        self.keep_outputs, self.grad_hook, self.source_hook = keep_outputs, grad_hook, source_hook
        self.outputs: list[torch.Tensor] = []
        self.contexts: dict[torch.device, Context] = {}  # ``ctx`` on the devices of layers placed elsewhere
        self.grad_from = 0  # the grad hook gets gradients from this position on
        self.neuron_removal: torch.Tensor | None = None  # [n_src, D]: 1 - neuron mask (with ``patch``)
        self.patch: torch.Tensor | None = None

    @classmethod
    def start(
        cls,
        model: Model,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        removal: torch.Tensor | None,
        patch: torch.Tensor | None,
        keep_outputs: bool = False,
        grad_hook: GradHook | None = None,
        input_embeddings: torch.Tensor | None = None,
        source_hook: SourceHook | None = None,
        spans: torch.Tensor | None = None,
        neuron_removal: torch.Tensor | None = None,
    ) -> _Run:
        """Validate the batch, embed it, and record the ``input`` source."""
        input_ids, attention_mask = check_batch(model, input_ids, attention_mask)
        batch, seq = input_ids.shape
        if patch is not None:
            check_patch(model, patch, batch, seq)
        shape = (batch, seq, model.adapter.d_model)
        deltas = None
        if removal is not None:
            deltas = _Deltas(removal, patch, shape) if removal.dim() == 2 else _SpanDeltas(removal, patch, shape, spans)
        position_ids = torch.arange(seq, device=input_ids.device).expand(batch, seq)
        if input_embeddings is None:
            resid = model.adapter.embed(input_ids, position_ids)
        else:
            check_embeddings(model, input_embeddings, batch, seq)
            resid = input_embeddings
        ctx = model.adapter.context(attention_mask, resid, position_ids)
        if model.placement is not None:  # the rotary tables come from the rotary module's device
            ctx = move_context(ctx, model.placement.home)
        run = cls(model, ctx, resid, deltas, keep_outputs, grad_hook, source_hook)
        run.neuron_removal, run.patch = neuron_removal, patch
        run.resid = run.masked(0, resid.unsqueeze(0))[0]
        run.add_sources(0, run.resid.unsqueeze(0))
        return run

    def masked(self, start: int, out: torch.Tensor) -> torch.Tensor:
        """Sources ``start`` onward as their readers see them under the neuron mask (``out`` without one)."""
        if self.neuron_removal is None:
            return out
        patch = None if self.patch is None else self.patch[start : start + len(out)]
        return _removed(out, self.neuron_removal[start : start + len(out), None, None, :], patch)

    def add_sources(self, start: int, out: torch.Tensor) -> None:
        if self.keep_outputs:
            self.outputs.append(out)
        if self.deltas is not None:
            self.deltas.add(start, out)
        if self.source_hook is not None:
            self.source_hook(start, out.detach())

    def read(self, destinations: slice, n_reads: int) -> torch.Tensor:
        """Inputs of ``destinations``: ``[n, B, T, D]``, or ``[1, B, T, D]`` when all read the stream.

        With a grad hook, inputs with one row per destination pass their gradient to it; a stream shared by
        several destinations is hooked by the reader that splits its gradient (``qkv``).
        """
        resid = self.resid
        inputs = resid.unsqueeze(0) if self.deltas is None else self.deltas.read(resid, destinations, n_reads)
        n = destinations.stop - destinations.start
        if self.grad_hook is not None and inputs.requires_grad and len(inputs) == n:
            # a function of its own, not a method: a hook holding the run would keep the graph in a cycle
            inputs.register_hook(partial(_hook_from, self.grad_hook, self.grad_from, destinations))
        return inputs

    def qkv(self, slots: LayerSlots, ctx: Context, there: Callable) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The layer's queries, keys and values from its attention destinations' reads (moved by ``there``)."""
        destinations = slots.attention_destinations
        inputs = there(self.read(destinations, slots.attention_reads))
        shared = len(inputs) == 1 and destinations.stop - destinations.start > 1
        if self.grad_hook is None or not inputs.requires_grad or not shared:
            return self.adapter.qkv(slots.layer, inputs, ctx)
        placement = self.model.placement
        stage = None if placement is None else placement.layers[slots.layer]
        split = _SplitGradient(
            self.adapter, slots.layer, ctx, destinations, self.grad_hook, self.resid.device, stage, self.grad_from
        )
        return _SharedQKV.apply(inputs, split)

    def layer(self, slots: LayerSlots) -> None:
        placement = self.model.placement
        stage = None if placement is None else placement.layers[slots.layer]
        if stage is None:  # on the input device with its weights in place: the plain computation, no copies
            self._layer(slots, self.ctx, _same, _same)
            return
        if stage.device not in self.contexts:
            self.contexts[stage.device] = move_context(self.ctx, stage.device)
        with stage:  # offloaded weights loaded onto the layer's device, and freed after it
            self._layer(slots, self.contexts[stage.device], stage.move, placement.home_tensor)

    def _layer(self, slots: LayerSlots, ctx: Context, there: Callable, back: Callable) -> None:
        """One layer; ``there`` moves its inputs to its device, ``back`` its outputs to the input device."""
        adapter, layer = self.adapter, slots.layer
        q, k, v = self.qkv(slots, ctx, there)
        mlp_slot = slice(slots.mlp_destination, slots.mlp_destination + 1)
        if adapter.parallel:  # the MLP reads the stream the heads read: before they are added
            mlp_in = there(self.read(mlp_slot, slots.mlp_reads))
        z = adapter.attend(layer, q, k, v, ctx)
        per_head = self.keep_outputs or self.source_hook is not None or self.neuron_removal is not None
        if per_head or (self.deltas is not None and self.deltas.needs_sources):
            heads = self.masked(slots.heads.start, back(adapter.head_outputs(layer, z)))
            self.add_sources(slots.heads.start, heads)
            attention_out = heads.sum(0)
            bias = adapter.out_bias(layer)
            if bias is not None:
                attention_out = attention_out + back(bias)
        else:
            attention_out = back(adapter.attention_output(layer, z))
        if adapter.parallel:
            mlp_out = self.masked(slots.mlp_source, back(adapter.mlp(layer, mlp_in)[:1]))[0]
            self.resid = mlp_out + attention_out + self.resid
        else:
            self.resid = attention_out + self.resid
            mlp_out = back(adapter.mlp(layer, there(self.read(mlp_slot, slots.mlp_reads)))[:1])
            mlp_out = self.masked(slots.mlp_source, mlp_out)[0]
            self.resid = self.resid + mlp_out
        self.add_sources(slots.mlp_source, mlp_out.unsqueeze(0))

    def logits(self, positions: torch.Tensor | None) -> torch.Tensor:
        n_dst = self.graph.n_dst
        final = self.read(slice(n_dst - 1, n_dst), self.graph.n_src)[0]
        if positions is not None:
            final = final[torch.arange(len(final), device=final.device), positions]
        if self.model.placement is not None:  # the final norm and the head may sit elsewhere: logits come back
            return self.model.placement.unembed(self.adapter, final)
        return self.adapter.unembed(final)


def _hook_from(hook: GradHook, start: int, destinations: slice, grad: torch.Tensor) -> None:
    hook(destinations, grad[:, :, start:])


def _same(x: torch.Tensor) -> torch.Tensor:
    return x


@dataclass
class _SplitGradient:
    """What the backward of one layer's shared q/k/v needs to give each destination its own gradient."""

    adapter: Adapter
    layer: int
    ctx: Context
    destinations: slice
    hook: GradHook
    home: torch.device  # where the hook gets its gradients (the input device)
    stage: object | None  # the layer's placement stage (loads offloaded weights), None when in place
    start: int = 0  # the first position whose per-destination gradients the hook takes


class _SharedQKV(torch.autograd.Function):
    """q, k, v of one layer from the stream ``[1, B, T, D]`` all its attention destinations read.

    The forward projects each head from a stride-0 view of the normed stream (as many flops as the fused
    projections, and no input is copied) and keeps that graph, from position ``start`` on; before it, the plain
    computation, kept as a constant (the backward computes those positions again for their gradient rather than
    hold their graph). The backward gives each destination its own input gradient ``[n, B, T - start, D]``
    (held for this layer only): the gradient at its head's view, then through the norm's Jacobian at the shared
    stream for all n at once (``circuits.arch.norms``). It passes those to the grad hook and returns their sum
    (with the plain gradient before ``start``), the stream's gradient.
    """

    @staticmethod
    def forward(ctx, inputs: torch.Tensor, split: _SplitGradient):
        adapter, layer, start = split.adapter, split.layer, split.start
        stream = inputs.detach()
        ctx.save_for_backward(inputs)
        ctx.split = split
        rules = adapter.backward_rules  # frozen norm statistics: the norm's Jacobian without them (GIM, RelP)
        ctx.norm_gradients = frozen_norm_input_gradients if rules and rules.freeze_norms else norm_input_gradients
        with torch.enable_grad():
            with torch.no_grad():
                shared = adapter.attention_norm(layer)(stream[:, :, start:])
                before = adapter.qkv(layer, stream[:, :, :start], _positions(split.ctx, 0, start)) if start else None
            ctx.parts = tuple(shared.expand(n, *shared.shape[1:]).requires_grad_(True) for n in adapter.qkv_counts())
            ctx.outputs = adapter.project_qkv(layer, ctx.parts, _positions(split.ctx, start))
            if start:  # positions before start enter as constants: the backward recomputes their gradient
                ctx.outputs = tuple(torch.cat(pair, 2) for pair in zip(before, ctx.outputs, strict=True))
        return tuple(output.detach() for output in ctx.outputs)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        (inputs,) = ctx.saved_tensors
        split, start = ctx.split, ctx.split.start
        adapter, layer = split.adapter, split.layer
        with split.stage if split.stage is not None else contextlib.nullcontext():
            normed_grads = torch.autograd.grad(ctx.outputs, ctx.parts, grads)  # each head's, at its view
            ctx.outputs = ctx.parts = None
            stream = inputs.detach()
            grad = ctx.norm_gradients(adapter.attention_norm(layer), stream[:, :, start:], normed_grads)
            if start:  # the plain gradient before start, its q/k/v computed again
                with torch.enable_grad():
                    prefix = stream[:, :, :start].requires_grad_(True)
                    outputs = adapter.qkv(layer, prefix, _positions(split.ctx, 0, start))
                    (prefix_grad,) = torch.autograd.grad(outputs, prefix, tuple(g[:, :, :start] for g in grads))
        split.hook(split.destinations, grad.to(split.home))
        stream_grad = grad.sum(0, keepdim=True).to(inputs.dtype)
        if start:
            stream_grad = torch.cat([prefix_grad, stream_grad], 2)
        return stream_grad, None


def _positions(ctx: Context, start: int, stop: int | None = None) -> Context:
    """``ctx`` for the positions ``start`` to ``stop`` of a per-position computation (q/k/v projections)."""
    if (not start and stop is None) or ctx.rotary is None:
        return ctx
    return replace(ctx, rotary=map_rotary(ctx.rotary, lambda table: table[:, start:stop]))


class PrefixCache:
    """One batch run with a base mask (default: all ones, the clean run), saved before every layer.

    ``run(edge_mask, from_layer)`` then computes only layers ``from_layer`` onward; it is exact
    when ``edge_mask`` equals the base mask on every destination before ``from_layer`` (true for
    single-edge ablations of the clean run, and for ACDC, which visits destinations in reverse).
    """

    def __init__(
        self,
        model: Model,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        patch: torch.Tensor | None,
        logit_positions: torch.Tensor | None = None,
        base_mask: torch.Tensor | None = None,
        spans: torch.Tensor | None = None,
    ):
        self.model, self.logit_positions, self.patch, self.spans = model, logit_positions, patch, spans
        graph = model.graph
        with torch.no_grad():
            if base_mask is None:
                removal = torch.zeros(graph.n_src, graph.n_dst, dtype=model.dtype, device=model.device)
            else:
                removal = check_edge_mask(model, base_mask, spans, input_ids)
            run = _Run.start(model, input_ids, attention_mask, removal, patch, spans=spans)
            self.ctx = run.ctx
            # per layer, before it: (stream, sum of deltas); by span (``_SpanDeltas``): (stream, deltas' chunks)
            self.states = []
            for slots in graph.layers:
                self.states.append((run.resid, self._saved(run.deltas)))
                run.layer(slots)
            self.states.append((run.resid, self._saved(run.deltas)))
            self.base_logits = run.logits(logit_positions)
        self.base_deltas = getattr(run.deltas, "buffer", None)
        self.working = None if self.base_deltas is None else self.base_deltas.clone()
        self.dirty_from = graph.n_src  # rows of ``working`` at and after this differ from the base run
        self.layers_run = 0  # layers computed by run(), for counting forward-pass equivalents

    @staticmethod
    def _saved(deltas: _Deltas | _SpanDeltas):
        """What a run from a layer takes of the deltas before it: their sum, or (by span) their chunks so far."""
        return list(deltas.chunks) if isinstance(deltas, _SpanDeltas) else deltas.total.clone()

    def reads_before(self, layer: int) -> int:
        """How many sources precede ``layer`` (``n_layers`` for the unembedding)."""
        graph = self.model.graph
        return graph.layers[layer].attention_reads if layer < graph.n_layers else graph.n_src

    def run(self, edge_mask: torch.Tensor, from_layer: int) -> torch.Tensor:
        """Logits with ``edge_mask``, recomputing only layers ``from_layer`` onward."""
        graph = self.model.graph
        start = self.reads_before(from_layer)
        with torch.no_grad():
            resid, saved = self.states[from_layer]
            deltas = self._deltas(edge_mask, tuple(resid.shape), saved, start)
            deltas.count = start
            run = _Run(self.model, self.ctx, resid, deltas)
            for slots in graph.layers[from_layer:]:
                run.layer(slots)
            self.layers_run += graph.n_layers - from_layer
            return run.logits(self.logit_positions)

    def _deltas(self, edge_mask: torch.Tensor, shape: tuple, saved, start: int) -> _Deltas | _SpanDeltas:
        """A run's deltas from ``start`` on, over the saved ones before it: by span, the saved chunks (read, never
        written: the run appends its own); else the working buffer, its rows before ``start`` the base run's."""
        if edge_mask.dim() == 3:
            deltas = _SpanDeltas(check_edge_mask(self.model, edge_mask, self.spans), self.patch, shape, self.spans)
            deltas.chunks = list(saved)
            return deltas
        if self.dirty_from < start:  # an earlier run from a lower layer overwrote rows we need
            self.working[self.dirty_from : start] = self.base_deltas[self.dirty_from : start]
        self.dirty_from = min(self.dirty_from, start)
        removal = check_edge_mask(self.model, edge_mask)
        return _Deltas(removal, self.patch, shape, buffer=self.working, total=saved.clone())

    def run_ablations(
        self, units: list[tuple[int, int | None]], from_layer: int, spans: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits ``[k, B, V]`` for k single ablations of the base run, side by side in one forward.

        A unit ``(u, v)`` ablates the edge ``u->v``; ``(u, None)`` every edge out of source ``u``; with each
        position's span ``spans`` ``[B, T]``, ``(u, v, s)`` the edge at the positions of span s only.
        Valid when the base mask is all ones (the clean run) and no unit touches a destination
        before ``from_layer``.
        """
        graph, copies = self.model.graph, len(units)
        resid, _ = self.states[from_layer]
        batch = resid.shape[0]
        with torch.no_grad():
            rows = torch.tensor([unit[0] for unit in units], device=self.base_deltas.device)
            deltas = self.base_deltas.index_select(0, rows).view(copies, *resid.shape)
            ctx = self.ctx
            ctx = Context(
                ctx.attention_mask.repeat(copies, 1, 1, 1),
                {w: m.repeat(copies, 1, 1, 1) for w, m in ctx.sliding_masks.items()},
                map_rotary(ctx.rotary, lambda table: table.repeat(copies, 1, 1)),
            )
            if spans is not None:  # each copy's delta at its span's positions only
                chosen = torch.tensor([unit[2] for unit in units], device=spans.device)
                deltas = deltas * (spans[None] == chosen[:, None, None]).to(deltas.dtype).unsqueeze(-1)
            run = _Run(self.model, ctx, resid.repeat(copies, 1, 1), _Ablations(units, deltas, batch))
            for slots in graph.layers[from_layer:]:
                run.layer(slots)
            self.layers_run += (graph.n_layers - from_layer) * copies
            positions = None if self.logit_positions is None else self.logit_positions.repeat(copies)
            logits = run.logits(positions)
        return logits.view(copies, batch, *logits.shape[1:])


class _Ablations:
    """Reads for k copies of one clean batch, copy r with one source ``u_r`` ablated on some destinations.

    Copy r's destination ``v_r`` (or every reader of ``u_r`` when ``v_r`` is None) reads
    ``resid - delta_{u_r}`` (at its span's positions only, when resolved by span); everything else reads its own
    copy's stream.
    """

    needs_sources = False

    def __init__(self, units: list[tuple], deltas: torch.Tensor, batch: int):
        self.units, self.deltas, self.batch = units, deltas, batch

    def add(self, start: int, out: torch.Tensor) -> None:
        pass  # ablated sources' deltas are those of the clean run

    def read(self, resid: torch.Tensor, destinations: slice, n_reads: int) -> torch.Tensor:
        hits = [
            (copy, None if v is None else v - destinations.start)
            for copy, (u, v, *_) in enumerate(self.units)
            if u < n_reads and (v is None or destinations.start <= v < destinations.stop)
        ]
        if not hits:
            return resid.unsqueeze(0)
        shared = all(column is None for _, column in hits)  # whole-node ablations: one stream per copy
        inputs = resid.unsqueeze(0).repeat(1 if shared else destinations.stop - destinations.start, 1, 1, 1)
        for copy, column in hits:
            rows = slice(copy * self.batch, (copy + 1) * self.batch)
            inputs[slice(None) if column is None else column, rows] -= self.deltas[copy]
        return inputs


class _Deltas:
    """The sources' ``out_u - patch_u`` so far, and the destination reads they imply.

    ``removal`` is ``1 - edge_mask``: how much of each source's delta a destination loses. A read is
    ``resid - removal^T @ deltas`` or, when fewer sources are kept than ablated, the equivalent
    ``ablated + edge_mask^T @ deltas``
    with ``ablated = resid - sum(deltas)`` (every source patched). A constant mask (every
    entry c, as integrated gradients use) needs no per-destination inputs at all: every
    destination reads ``resid - (1 - c) * sum(deltas)``. Without autograd the deltas live in
    one preallocated buffer and only the rows that matter are read; with autograd they are
    kept as a list of chunks (no in-place writes). With autograd, a mask constant along each
    source's row (every edge of a source at one value, as ``eap-ig-activations`` holds a
    layer's outputs) needs no per-destination inputs either: every destination reads
    ``resid - sum_u (1 - m_u) * delta_u``, summed as the sources come.
    """

    needs_sources = True

    def __init__(
        self,
        removal: torch.Tensor,
        patch: torch.Tensor | None,
        shape: tuple[int, int, int],
        buffer: torch.Tensor | None = None,
        total: torch.Tensor | None = None,
    ):
        self.removal, self.patch, self.shape = removal, patch, shape
        self.differentiable = torch.is_grad_enabled()
        self.chunks: list[torch.Tensor] = []
        self.count = 0
        first = removal.flatten()[0]
        self.uniform = None if removal.requires_grad or not bool((removal == first).all()) else first
        self.by_source = None  # each source's removal, when it is the same for every destination (with autograd)
        if self.differentiable and self.uniform is None and not removal.requires_grad:
            if bool((removal == removal[:, :1]).all()):
                self.by_source = removal[:, 0]
        self.removed = None  # with ``by_source``: the sum of the removed deltas so far (None: nothing removed)
        options = dict(dtype=removal.dtype, device=removal.device)
        self.total = torch.zeros(shape, **options) if total is None else total
        if not self.differentiable:
            self.buffer = torch.empty(removal.shape[0], math.prod(shape), **options) if buffer is None else buffer

    def add(self, start: int, out: torch.Tensor) -> None:
        delta = out if self.patch is None else out - self.patch[start : start + len(out)]
        if self.differentiable:
            if self.by_source is not None:  # every destination reads one stream: the removed sum only
                weights = self.by_source[start : start + len(delta)]
                if weights.any():
                    removed = (weights.view(-1, 1, 1, 1) * delta).sum(0)
                    self.removed = removed if self.removed is None else self.removed + removed
            elif self.uniform is None:  # a constant mask reads the sum only
                self.chunks.append(delta)
            self.total = self.total + delta.sum(0)
        else:
            self.buffer[start : start + len(delta)] = delta.flatten(1)
            self.total += delta.sum(0)
        self.count = start + len(out)

    def read(self, resid: torch.Tensor, destinations: slice, n_reads: int) -> torch.Tensor:
        assert n_reads == self.count, "a destination reads every source computed before it"
        if self.uniform is not None:
            return (resid - self.uniform * self.total).unsqueeze(0)
        if self.by_source is not None:
            return (resid if self.removed is None else resid - self.removed).unsqueeze(0)
        removal = self.removal[:n_reads, destinations]
        n = removal.shape[1]
        if self.differentiable:
            removed = None
            start = 0
            for delta in self.chunks:
                if start >= n_reads:
                    break
                weights = removal[start : start + len(delta)]
                start += len(delta)
                if weights.requires_grad or weights.any():
                    term = (weights.T @ delta.flatten(1)).view(n, *self.shape)
                    removed = term if removed is None else removed + term
            return resid.unsqueeze(0) if removed is None else resid.unsqueeze(0) - removed
        ablated_rows = removal.any(1).nonzero().flatten()
        if len(ablated_rows) == 0:
            return resid.unsqueeze(0)  # nothing ablated here: every destination reads the same stream
        mask = 1 - removal
        kept_rows = mask.any(1).nonzero().flatten()
        if len(kept_rows) < len(ablated_rows):
            added = self._contract(mask, kept_rows)
            return (resid - self.total).unsqueeze(0) + added.view(n, *self.shape)
        return resid.unsqueeze(0) - self._contract(removal, ablated_rows).view(n, *self.shape)

    def _contract(self, weights: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """``weights^T @ deltas`` over the given rows; a gather pays off only when they are few."""
        if 4 * len(rows) > len(weights):
            return weights.T @ self.buffer[: len(weights)]
        return weights[rows].T @ self.buffer.index_select(0, rows)


class _SpanDeltas:
    """The sources' deltas read by span: removal ``[n_src, n_dst, S]`` and each position's span ``[B, T]``.

    The deltas are kept with their positions sorted by span, so that each span's read is one product over a
    contiguous block of positions; the blocks are put back in position order after. Plain reads with the
    edges of a span's positions only; every mask is read as given (no shortcut for constant masks).
    """

    needs_sources = True

    def __init__(self, removal: torch.Tensor, patch: torch.Tensor | None, shape: tuple, spans: torch.Tensor):
        self.removal, self.patch, self.shape = removal, patch, shape
        flat = spans.flatten()
        self.order = torch.argsort(flat, stable=True)  # positions grouped by span
        self.inverse = torch.argsort(self.order)
        counts = torch.bincount(flat, minlength=removal.shape[2]).tolist()
        ends = torch.tensor(counts).cumsum(0).tolist()
        self.blocks = [(s, end - count, end) for s, (count, end) in enumerate(zip(counts, ends, strict=True)) if count]
        self.chunks: list[torch.Tensor] = []  # per group of sources: deltas [k, B * T sorted by span, D]
        self.count = 0

    def add(self, start: int, out: torch.Tensor) -> None:
        delta = out if self.patch is None else out - self.patch[start : start + len(out)]
        delta = delta.expand(len(out), *self.shape)  # a patch may broadcast over the batch
        self.chunks.append(delta.flatten(1, 2).index_select(1, self.order))
        self.count = start + len(out)

    def read(self, resid: torch.Tensor, destinations: slice, n_reads: int) -> torch.Tensor:
        assert n_reads == self.count, "a destination reads every source computed before it"
        removal = self.removal[:n_reads, destinations]  # [k, n, S]
        if not removal.requires_grad and not removal.any():
            return resid.unsqueeze(0)
        n, d_model = removal.shape[1], self.shape[-1]
        parts = []
        for span, first, end in self.blocks:
            removed, start = None, 0
            for delta in self.chunks:
                weights = removal[start : start + len(delta), :, span]
                start += len(delta)
                if weights.requires_grad or weights.any():
                    term = weights.T @ delta[:, first:end].flatten(1)
                    removed = term if removed is None else removed + term
            parts.append(resid.new_zeros(n, (end - first) * d_model) if removed is None else removed)
        removed = torch.cat([part.view(n, -1, d_model) for part in parts], 1).index_select(1, self.inverse)
        return resid.unsqueeze(0) - removed.view(n, *self.shape)


@contextlib.contextmanager
def hidden_units(model: Model, transform: Callable[[int, torch.Tensor], torch.Tensor]):
    """While the block runs, each MLP's hidden units ``h`` ``[B, T, d_mlp]`` (the input of its output projection,
    ``Adapter.mlp_hidden_module``) are replaced by ``transform(layer, h)``: to read them, patch them, or hook their
    gradient. Every module is found before any hook is installed; the hooks are removed on exit."""
    adapter = model.adapter
    modules = [adapter.mlp_hidden_module(layer) for layer in range(adapter.n_layers)]
    hooks = []
    try:
        for layer, module in enumerate(modules):
            hooks.append(module.register_forward_pre_hook(partial(_transform_hidden, transform, layer)))
        yield
    finally:
        for hook in hooks:
            hook.remove()


def _transform_hidden(transform: Callable, layer: int, module, args: tuple) -> tuple:
    return (transform(layer, args[0]), *args[1:])


def _mask_hidden(removal: torch.Tensor, patch: torch.Tensor | None, layer: int, hidden: torch.Tensor) -> torch.Tensor:
    return _removed(hidden, removal[layer].to(hidden.device), None if patch is None else patch[layer].to(hidden.device))


def _removed(values: torch.Tensor, removal: torch.Tensor, patch: torch.Tensor | None) -> torch.Tensor:
    """``values`` with ``removal`` of their way to ``patch`` (zero when None) gone: ``patch + m (values - patch)``."""
    return values - removal * (values if patch is None else values - patch)


def mlp_hidden_values(
    model: Model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Every MLP's hidden units on these prompts, ``[n_layers, B, T, d_mlp]`` (no gradients): the patching values
    of the ``mlp-neuron`` level."""
    input_ids, attention_mask = check_batch(model, input_ids, attention_mask)
    values: dict[int, torch.Tensor] = {}

    def keep(layer: int, hidden: torch.Tensor) -> torch.Tensor:
        values[layer] = hidden.detach().reshape(*input_ids.shape, -1).to(model.device)
        return hidden

    with torch.no_grad(), hidden_units(model, keep):
        patched_forward(model, input_ids, attention_mask, logit_positions=_first(input_ids))
    return torch.stack([values[layer] for layer in range(model.adapter.n_layers)])


def mlp_width(model: Model) -> int:
    """The MLPs' hidden units per layer (one width for every layer; a model with several is refused)."""
    widths = {model.adapter.mlp_width(layer) for layer in range(model.adapter.n_layers)}
    if len(widths) != 1:
        raise CircuitsError(f"the MLPs have different widths {sorted(widths)}; the mlp-neuron level needs one")
    return widths.pop()


def unchanged_prefix(
    model: Model, clean_ids: torch.Tensor, corrupted_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> int:
    """How many leading positions every pair of the batch shares (at most ``seq - 1``).

    In a causal model no source's output differs between the clean and the corrupted prompts there, so every
    patching delta is zero and those positions add nothing to any score. A bidirectional model has none (0).
    """
    seq = clean_ids.shape[1]
    if not model.adapter.causal or clean_ids.shape != corrupted_ids.shape:
        return 0
    differs = clean_ids != corrupted_ids
    if attention_mask is not None:
        differs &= attention_mask.bool()
    first = torch.where(differs.any(1), differs.int().argmax(1), seq)
    return min(int(first.min()), seq - 1)


def source_outputs(
    model: Model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, start: int = 0
) -> torch.Tensor:
    """Every source's output on these prompts from position ``start`` on, ``[n_src, B, T - start, D]``, without
    gradients; written into one buffer as the sources are computed (never two copies of it)."""
    input_ids, attention_mask = as_batch(model, input_ids, attention_mask)
    batch, seq = input_ids.shape
    if not 0 <= start < seq:
        raise CircuitsError(f"start must be a position of the prompts (0 to {seq - 1}), got {start}")
    buffer = torch.empty(
        (model.graph.n_src, batch, seq - start, model.adapter.d_model), dtype=model.dtype, device=model.device
    )

    def keep(first: int, outputs: torch.Tensor) -> None:
        buffer[first : first + len(outputs)] = outputs[:, :, start:]

    with torch.no_grad():
        patched_forward(model, input_ids, attention_mask, logit_positions=_first(input_ids), source_hook=keep)
    return buffer


def patching_values(
    model: Model,
    clean_attention_mask: torch.Tensor,
    corrupted_ids: torch.Tensor,
    corrupted_attention_mask: torch.Tensor | None = None,
    start: int = 0,
) -> torch.Tensor:
    """Ablation values for ``patching``: the corrupted prompts' source outputs (from position ``start`` on).

    Checks that every clean/corrupted pair has the same length, naming the first example that does not.
    """
    corrupted_ids, corrupted_attention_mask = check_batch(model, corrupted_ids, corrupted_attention_mask, "corrupted")
    clean_attention_mask = _as_tensor(model, clean_attention_mask, "clean attention mask")
    if clean_attention_mask.shape != corrupted_attention_mask.shape:
        raise CircuitsError(
            f"clean batch has shape {tuple(clean_attention_mask.shape)} but corrupted batch has shape "
            f"{tuple(corrupted_attention_mask.shape)}; pairs must line up"
        )
    clean_lengths = clean_attention_mask.sum(1)
    corrupted_lengths = corrupted_attention_mask.sum(1)
    mismatched = (clean_lengths != corrupted_lengths).nonzero().flatten().tolist()
    if mismatched:
        i = mismatched[0]
        raise CircuitsError(
            f"example {i}: the clean prompt has {int(clean_lengths[i])} tokens but the corrupted prompt has "
            f"{int(corrupted_lengths[i])}; the two prompts of a pair must have equal length "
            f"({len(mismatched)} pair(s) differ)"
        )
    return source_outputs(model, corrupted_ids, corrupted_attention_mask, start)


def mean_values(
    model: Model, batches: Iterable[tuple[torch.Tensor, torch.Tensor | None]] | torch.Tensor, attention_mask=None
) -> torch.Tensor:
    """Ablation values for ``mean``: each source's output averaged over examples and real positions.

    Takes one batch (``input_ids, attention_mask``) or an iterable of ``(input_ids, attention_mask)``
    batches. Shape ``[n_src, 1, 1, D]``: one value per source, the same at every position.
    """
    if _one_batch(batches):
        batches = [(batches, attention_mask)]
    total, count = None, 0
    for input_ids, mask in batches:
        input_ids, mask = check_batch(model, input_ids, mask)
        outputs = source_outputs(model, input_ids, mask)
        summed = (outputs * mask.to(outputs.dtype)[None, :, :, None]).sum((1, 2), dtype=torch.float32)
        total = summed if total is None else total + summed
        count += int(mask.sum())
    return (total / count).to(outputs.dtype)[:, None, None, :]  # summed in float32, in the model's dtype


def _one_batch(batches: object) -> bool:
    """Is ``batches`` one batch of ids (a tensor, a numpy array, rows of numbers), not an iterable of batches?"""
    if isinstance(batches, torch.Tensor) or hasattr(batches, "__array_interface__"):  # numpy, without importing it
        return True
    if not isinstance(batches, (list, tuple)) or not batches or not isinstance(batches[0], (list, tuple)):
        return False
    return not batches[0] or isinstance(batches[0][0], numbers.Number)


def _first(input_ids: torch.Tensor) -> torch.Tensor:
    return torch.zeros(input_ids.shape[0], dtype=torch.long, device=input_ids.device)


# --- validation ----------------------------------------------------------------------------


def as_batch(model: Model, input_ids, attention_mask=None, what: str = "input") -> tuple:
    """Ids and attention mask as users hold them: nested lists and numpy arrays become tensors on the
    model's device (long ones when they hold integers); tensors and anything else are returned as given."""
    return _as_tensor(model, input_ids, f"{what} ids"), _as_tensor(model, attention_mask, f"{what} attention mask")


def _as_tensor(model: Model, value, what: str):
    if not isinstance(value, (list, tuple)) and not hasattr(value, "__array_interface__"):  # numpy arrays
        return value  # a tensor, None, or something the checks reject
    try:
        tensor = torch.as_tensor(value, device=model.device)
    except (TypeError, ValueError, RuntimeError) as error:
        rows = [len(row) if isinstance(row, (list, tuple)) else None for row in value]
        for i, length in enumerate(rows):
            if length != rows[0]:
                raise CircuitsError(
                    f"example {i}: the {what} have {length} entries but example 0's have {rows[0]}; "
                    "right-pad the rows to one length (and pass an attention mask)"
                ) from None
        raise CircuitsError(f"{what} must be a [batch, seq] array of numbers: {error}") from None
    if tensor.dtype == torch.bool or tensor.is_floating_point() or tensor.is_complex():
        return tensor  # the checks judge it as they would such a tensor
    return tensor.long()


def check_batch(
    model: Model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, what: str = "input"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate a right-padded batch (converted by ``as_batch``); returns the ids and the attention mask
    (all ones if None)."""
    input_ids, attention_mask = as_batch(model, input_ids, attention_mask, what)
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise CircuitsError(f"{what} ids must be a [batch, seq] tensor, got {shape}")
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise CircuitsError(f"empty batch: {what} ids have shape {tuple(input_ids.shape)}")
    if input_ids.dtype not in (torch.long, torch.int, torch.int32, torch.int64):
        raise CircuitsError(f"{what} ids must be integer token ids, got dtype {input_ids.dtype}")
    if input_ids.device != model.device:
        raise CircuitsError(f"{what} ids are on {input_ids.device} but the model is on {model.device}")
    vocab = model.adapter.embedding_rows()
    bad = ((input_ids < 0) | (input_ids >= vocab)).nonzero()
    if len(bad):
        b, t = bad[0].tolist()
        raise CircuitsError(
            f"example {b}, position {t}: token id {int(input_ids[b, t])} is outside the vocabulary (0..{vocab - 1})"
        )
    if attention_mask is None:
        _check_length(model, input_ids.shape[1], None, what)
        return input_ids, torch.ones_like(input_ids)
    if not isinstance(attention_mask, torch.Tensor):
        raise CircuitsError(f"{what} attention mask must be a [batch, seq] tensor, got {type(attention_mask).__name__}")
    if attention_mask.shape != input_ids.shape:
        raise CircuitsError(
            f"{what} attention mask has shape {tuple(attention_mask.shape)} "
            f"but the ids have shape {tuple(input_ids.shape)}"
        )
    if attention_mask.device != model.device:
        raise CircuitsError(f"{what} attention mask is on {attention_mask.device} but the model is on {model.device}")
    mask = attention_mask.bool()
    lengths = mask.sum(1)
    right_padded = mask == (torch.arange(mask.shape[1], device=mask.device)[None, :] < lengths[:, None])
    for i in (~right_padded.all(1) | (lengths == 0)).nonzero().flatten().tolist()[:1]:
        problem = "is empty" if lengths[i] == 0 else "is not right-padded (ones, then zeros)"
        raise CircuitsError(f"example {i}: the {what} attention mask {problem}: {attention_mask[i].tolist()}")
    _check_length(model, input_ids.shape[1], lengths, what)
    return input_ids, attention_mask


def _check_length(model: Model, width: int, lengths: torch.Tensor | None, what: str) -> None:
    """The batch fits the model's positions: no prompt (``lengths``, all ``width`` if None) and no padding past them."""
    limit = model.adapter.max_positions
    if limit is None or width <= limit:
        return
    limit_text = f"the model takes at most {limit} ({model.adapter.position_limit})"
    too_long = [0] if lengths is None else (lengths > limit).nonzero().flatten().tolist()
    if not too_long:
        raise CircuitsError(f"the {what} batch is padded to {width} positions; {limit_text}: trim the padding")
    length = width if lengths is None else int(lengths[too_long[0]])
    raise CircuitsError(f"example {too_long[0]}: the {what} prompt is {length} tokens long; {limit_text}")


def check_task(model: Model, tokenized: TokenizedTask) -> None:
    """A tokenized task against the model, before anything runs: every prompt fits the model's positions and
    holds ids of its vocabulary, every answer, wrong answer and output id is one of its outputs. Errors name
    the example by its index in the whole task (``tokenized.start`` onward)."""
    adapter, start = model.adapter, tokenized.start
    mask = tokenized.attention_mask.bool()
    lengths = mask.sum(1)
    limit = adapter.max_positions
    if limit is not None:
        for i in (lengths > limit).nonzero().flatten().tolist()[:1]:
            raise CircuitsError(
                f"example {start + i}: the prompts are {int(lengths[i])} tokens long; "
                f"the model takes at most {limit} ({adapter.position_limit})"
            )
    vocab = adapter.embedding_rows()
    for field in ("clean", "corrupted"):
        ids = getattr(tokenized, f"{field}_ids")
        for i, t in (((ids < 0) | (ids >= vocab)) & mask).nonzero().tolist()[:1]:
            raise CircuitsError(
                f"example {start + i}, position {t}: {field} token id {int(ids[i, t])} is outside the vocabulary "
                f"(0..{vocab - 1})"
            )
    outputs = adapter.output_size()
    checks = [
        ("answer id", tokenized.answer_ids, tokenized.answer_mask),
        ("wrong answer id", tokenized.wrong_ids, tokenized.wrong_mask),
    ]
    if tokenized.output_mask is not None and not tokenized.numeric:
        checks.append(("output id", tokenized.targets, tokenized.output_mask))
    for label, ids, present in checks:
        for i, k in (((ids < 0) | (ids >= outputs)) & present.bool()).nonzero().tolist()[:1]:
            where = f", position {k}" if label == "output id" else ""
            raise CircuitsError(
                f"example {start + i}{where}: {label} {int(ids[i, k])} is outside the model's output vocabulary "
                f"(0..{outputs - 1})"
            )


def check_edge_mask(
    model: Model, edge_mask: torch.Tensor, spans: torch.Tensor | None = None, input_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """Validate an edge mask (``[n_src, n_dst]``, or ``[n_src, n_dst, S]`` with each position's span ``spans``);
    returns its removal ``1 - mask`` in the model's dtype (the weight on each delta)."""
    graph = model.graph
    expected = (graph.n_src, graph.n_dst)
    resolved = isinstance(edge_mask, torch.Tensor) and edge_mask.dim() == 3
    shaped = isinstance(edge_mask, torch.Tensor) and edge_mask.dim() in (2, 3)
    if not shaped or tuple(edge_mask.shape[:2]) != expected:
        shape = tuple(edge_mask.shape) if isinstance(edge_mask, torch.Tensor) else type(edge_mask).__name__
        raise CircuitsError(
            f"edge mask has shape {shape}; this model's graph needs [n_src, n_dst] = {list(expected)} "
            "(or [n_src, n_dst, n_spans] with spans)"
        )
    if resolved:
        _check_spans(model, spans, edge_mask.shape[2], input_ids)
    elif spans is not None:
        raise CircuitsError("spans are given but the edge mask is not resolved by span ([n_src, n_dst, n_spans])")
    if not edge_mask.is_floating_point():
        raise CircuitsError(f"edge mask must be a float tensor (0 = ablated, 1 = kept), got dtype {edge_mask.dtype}")
    if edge_mask.device != model.device:
        raise CircuitsError(f"edge mask is on {edge_mask.device} but the model is on {model.device}")
    return (1 - edge_mask).to(model.dtype)


def _check_spans(model: Model, spans: torch.Tensor | None, count: int, input_ids: torch.Tensor | None) -> None:
    if spans is None:
        raise CircuitsError(f"an edge mask resolved by {count} spans needs each position's span: pass spans [B, T]")
    shape = None if input_ids is None else tuple(input_ids.shape)
    if not isinstance(spans, torch.Tensor) or spans.dtype != torch.long or (shape and tuple(spans.shape) != shape):
        got = f"{tuple(spans.shape)} {spans.dtype}" if isinstance(spans, torch.Tensor) else type(spans).__name__
        raise CircuitsError(f"spans must be a long tensor of the ids' shape {shape}, got {got}")
    if spans.device != model.device:
        raise CircuitsError(f"spans are on {spans.device} but the model is on {model.device}")
    if len(spans) and (int(spans.min()) < 0 or int(spans.max()) >= count):
        b, t = ((spans < 0) | (spans >= count)).nonzero()[0].tolist()
        raise CircuitsError(f"example {b}, position {t}: span {int(spans[b, t])} is not one of the mask's {count}")


def check_neuron_mask(model: Model, neuron_mask: torch.Tensor) -> torch.Tensor:
    """Validate a mask on the sources' output dimensions ``[n_src, D]``; returns its removal ``1 - mask``."""
    expected = (model.graph.n_src, model.adapter.d_model)
    return _removal(model, neuron_mask, expected, "neuron mask", "[n_src, d_model]")


def check_hidden_mask(model: Model, hidden_mask: torch.Tensor) -> torch.Tensor:
    """Validate a mask on the MLPs' hidden units ``[n_layers, d_mlp]``; returns its removal ``1 - mask``."""
    expected = (model.adapter.n_layers, mlp_width(model))
    return _removal(model, hidden_mask, expected, "hidden-unit mask", "[n_layers, d_mlp]")


def check_hidden_patch(model: Model, patch: torch.Tensor, batch: int, seq: int, width: int) -> None:
    """The MLP hidden units' ablation values: ``[n_layers, batch or 1, seq or 1, d_mlp]`` in the model's dtype."""
    layers = model.adapter.n_layers
    shape = tuple(patch.shape) if isinstance(patch, torch.Tensor) else None
    if shape is None or len(shape) != 4 or shape[0] != layers or shape[1] not in (1, batch) or shape[2] not in (1, seq):
        raise CircuitsError(
            f"hidden-unit ablation values have shape {shape or type(patch).__name__}; need [n_layers, batch or 1, "
            f"seq or 1, d_mlp] = [{layers}, {batch}, {seq}, {width}]"
        )
    if shape[3] != width:
        raise CircuitsError(f"hidden-unit ablation values have {shape[3]} units per layer; the MLPs have {width}")
    if patch.dtype != model.dtype or patch.device != model.device:
        raise CircuitsError(
            f"hidden-unit ablation values are {patch.dtype} on {patch.device}; the model is {model.dtype} on "
            f"{model.device}"
        )


def _removal(model: Model, mask: torch.Tensor, expected: tuple, what: str, layout: str) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != expected:
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise CircuitsError(f"{what} has shape {shape}; this model needs {layout} = {list(expected)}")
    if not mask.is_floating_point():
        raise CircuitsError(f"{what} must be a float tensor (0 = ablated, 1 = kept), got dtype {mask.dtype}")
    if mask.device != model.device:
        raise CircuitsError(f"{what} is on {mask.device} but the model is on {model.device}")
    return (1 - mask).to(model.dtype)


def check_embeddings(model: Model, embeddings: torch.Tensor, batch: int, seq: int) -> None:
    expected = (batch, seq, model.adapter.d_model)
    if tuple(embeddings.shape) != expected:
        raise CircuitsError(f"input embeddings have shape {tuple(embeddings.shape)}; need {list(expected)}")
    if embeddings.dtype != model.dtype or embeddings.device != model.device:
        raise CircuitsError(
            f"input embeddings are {embeddings.dtype} on {embeddings.device}; "
            f"the model is {model.dtype} on {model.device}"
        )


def check_patch(model: Model, patch: torch.Tensor, batch: int, seq: int) -> None:
    n_src, d_model = model.graph.n_src, model.adapter.d_model
    shape = tuple(patch.shape)
    if (
        patch.dim() != 4
        or shape[0] != n_src
        or shape[1] not in (1, batch)
        or shape[2] not in (1, seq)
        or shape[3] != d_model
    ):
        raise CircuitsError(
            f"ablation values have shape {shape}; need [n_src, batch or 1, seq or 1, d_model] = "
            f"[{n_src}, {batch}, {seq}, {d_model}]"
        )
    if patch.dtype != model.dtype:
        raise CircuitsError(f"ablation values have dtype {patch.dtype} but the model runs in {model.dtype}")
    if patch.device != model.device:
        raise CircuitsError(f"ablation values are on {patch.device} but the model is on {model.device}")
