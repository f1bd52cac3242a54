"""A naive, independent implementation of edge patching with plain PyTorch hooks.

It shares no code with the engine: it reads source outputs and rewrites one
destination's input on the unmodified HF model, using the HF modules' own
forward methods. Used as the oracle for the engine's invariants and for the
exact methods.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Layout:
    """Where things live in one HF family's module tree."""

    layers: nn.ModuleList
    final_norm: nn.Module
    attn_norm: str | None  # name of the norm feeding q/k/v, per layer (None: the projections read the stream)
    mlp_norm: str | None  # name of the norm feeding the MLP, per layer (may be attn_norm: parallel blocks)
    mlp: str
    out_proj: str  # attention output projection (its input is the per-head mix z)
    # "q"/"k"/"v" -> (module path, function(head) -> column slice of its output, path of a module applied to that
    # whole output before heads are split (OLMo 2's q/k norms) or None)
    projections: dict
    out_proj_is_conv1d: bool = False
    attn_post_norm: str | None = None  # a norm on the summed attention output before it joins the stream
    mlp_out: str | None = None  # the module whose output is the MLP's write to the stream (default: mlp)
    residual_multiplier: float = 1.0  # every attention and MLP write is scaled by this (Granite)


def llama_like(hf: nn.Module, **overrides) -> Layout:
    """The Llama family's layout (``model.layers``, ``self_attn.{q,k,v,o}_proj``), with a family's differences."""
    cfg = hf.config
    e = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    fields = dict(
        layers=hf.model.layers,
        final_norm=hf.model.norm,
        attn_norm="input_layernorm",
        mlp_norm="post_attention_layernorm",
        mlp="mlp",
        out_proj="self_attn.o_proj",
        projections={c: (f"self_attn.{c}_proj", lambda h: slice(h * e, (h + 1) * e), None) for c in "qkv"},
    )
    return Layout(**(fields | overrides))


# model_type -> its layout, for the families that differ from the Llama family's
LAYOUTS = {}


def layout(hf: nn.Module) -> Layout:
    cfg = hf.config
    if cfg.model_type in LAYOUTS:
        return LAYOUTS[cfg.model_type](hf)
    if cfg.model_type == "gpt2":
        d, e = cfg.n_embd, cfg.n_embd // cfg.n_head
        return Layout(
            hf.transformer.h,
            hf.transformer.ln_f,
            "ln_1",
            "ln_2",
            "mlp",
            "attn.c_proj",
            {
                c: ("attn.c_attn", lambda h, i=i: slice(i * d + h * e, i * d + (h + 1) * e), None)
                for i, c in enumerate("qkv")
            },
            True,
        )
    if cfg.model_type == "gpt_neox":
        e = cfg.hidden_size // cfg.num_attention_heads
        return Layout(
            hf.gpt_neox.layers,
            hf.gpt_neox.final_layer_norm,
            "input_layernorm",
            "post_attention_layernorm",
            "mlp",
            "attention.dense",
            {
                c: ("attention.query_key_value", lambda h, i=i: slice(h * 3 * e + i * e, h * 3 * e + (i + 1) * e), None)
                for i, c in enumerate("qkv")
            },
        )
    return llama_like(hf)


def _module(root: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        root = getattr(root, part)
    return root


def _first_arg(args, kwargs):
    return args[0] if args else kwargs["hidden_states"]


class Oracle:
    """Patch one edge ``src->dst`` of an HF model by hooks; returns the logits."""

    def __init__(self, hf: nn.Module):
        self.hf, self.cfg, self.lay = hf, hf.config, layout(hf)
        self.n_heads = getattr(self.cfg, "num_attention_heads", None) or self.cfg.n_head

    @contextmanager
    def _capture_source(self, src: str, store: dict):
        """Record source ``src``'s output into ``store['out']`` as the model runs."""
        lay = self.lay
        if src == "input":
            hooks = [
                lay.layers[0].register_forward_pre_hook(
                    lambda m, a, k: store.__setitem__("out", _first_arg(a, k).clone()), with_kwargs=True
                )
            ]
        elif (match := re.fullmatch(r"a(\d+)\.h(\d+)", src)) is not None:
            layer, head = int(match[1]), int(match[2])
            proj = _module(lay.layers[layer], lay.out_proj)
            e = proj.weight.shape[0 if lay.out_proj_is_conv1d else 1] // self.n_heads
            columns = slice(head * e, (head + 1) * e)

            def record(module, args):
                z = args[0][..., columns]
                weight = module.weight[columns, :] if lay.out_proj_is_conv1d else module.weight[:, columns].T
                store["out"] = z @ weight * lay.residual_multiplier

            def post_norm(module, args, out):  # a norm of the heads' sum scales each position: the head's share
                store["out"] = store["out"] * (out / args[0])

            hooks = [proj.register_forward_pre_hook(record)]
            if lay.attn_post_norm is not None:
                hooks.append(_module(lay.layers[layer], lay.attn_post_norm).register_forward_hook(post_norm))
        else:
            layer = int(re.fullmatch(r"m(\d+)", src)[1])
            mlp = _module(lay.layers[layer], lay.mlp_out or lay.mlp)

            def record_mlp(module, args, out):
                out = out[0] if isinstance(out, tuple) else out  # MoE blocks may return router logits too
                store["out"] = out.clone() * lay.residual_multiplier

            hooks = [mlp.register_forward_hook(record_mlp)]
        try:
            yield
        finally:
            for hook in hooks:
                hook.remove()

    @contextmanager
    def _rewrite_destination(self, dst: str, shift):
        """Replace destination ``dst``'s input stream x by x - shift() (shift is read lazily)."""
        lay = self.lay
        seen = {}

        def remember(module, args, kwargs):
            seen["x"] = _first_arg(args, kwargs)

        if dst == "logits":
            hooks = [lay.final_norm.register_forward_pre_hook(lambda m, a: (a[0] - shift(),) + tuple(a[1:]))]
        elif re.fullmatch(r"m\d+", dst):
            block = lay.layers[int(dst[1:])]
            norm = _module(block, lay.mlp_norm) if lay.mlp_norm else None
            mlp = _module(block, lay.mlp)

            def patch_input(module, args, kwargs):  # the MLP's input from the shifted stream (its norm maybe shared)
                patched = seen["x"] - shift()
                patched = norm.forward(patched) if norm is not None else patched
                return (patched,) + tuple(args[1:]), {k: v for k, v in kwargs.items() if k != "hidden_states"}

            hooks = [
                (norm or mlp).register_forward_pre_hook(remember, with_kwargs=True),
                mlp.register_forward_pre_hook(patch_input, with_kwargs=True),
            ]
        else:
            match = re.fullmatch(r"a(\d+)\.h(\d+)<([qkv])>", dst)
            layer, head, which = int(match[1]), int(match[2]), match[3]
            block = lay.layers[layer]
            norm = _module(block, lay.attn_norm) if lay.attn_norm else None
            path, columns, then = lay.projections[which]
            proj = _module(block, path)
            hooked = _module(block, then) if then else proj  # the module whose output is split into heads

            def replace(module, args, out):
                patched = seen["x"] - shift()
                patched = proj.forward(norm.forward(patched) if norm is not None else patched)
                if then:
                    patched = hooked.forward(patched)
                out = out.clone()
                out[..., columns(head)] = patched[..., columns(head)]
                return out

            hooks = [
                (norm or proj).register_forward_pre_hook(remember, with_kwargs=True),
                hooked.register_forward_hook(replace),
            ]
        try:
            yield
        finally:
            for hook in hooks:
                hook.remove()

    @torch.no_grad()
    def source_output(self, src: str, input_ids, attention_mask) -> torch.Tensor:
        store = {}
        with self._capture_source(src, store):
            self.hf(input_ids, attention_mask=attention_mask)
        return store["out"]

    @torch.no_grad()
    def patch_edge(
        self, edge: str, clean_ids, attention_mask, ablation: torch.Tensor | None, weight: float = 0.0
    ) -> torch.Tensor:
        """Logits with ``edge`` at mask value ``weight``: its destination reads
        ``out + (1 - weight) * (ablation - out)`` from the source. ``ablation`` None means zero."""
        src, dst = edge.split("->")
        store = {}

        def shift():
            patch = torch.zeros_like(store["out"]) if ablation is None else ablation
            return (1 - weight) * (store["out"] - patch)

        with self._capture_source(src, store), self._rewrite_destination(dst, shift):
            return self.hf(clean_ids, attention_mask=attention_mask).logits
