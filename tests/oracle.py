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
    attn_norm: str  # name of the norm feeding q/k/v, per layer
    mlp_norm: str  # name of the norm feeding the MLP, per layer
    mlp: str
    out_proj: str  # attention output projection (its input is the per-head mix z)
    projections: dict  # "q"/"k"/"v" -> (module path, function(head) -> column slice of its output)
    out_proj_is_conv1d: bool


def layout(hf: nn.Module) -> Layout:
    cfg = hf.config
    if cfg.model_type == "gpt2":
        d, e = cfg.n_embd, cfg.n_embd // cfg.n_head
        return Layout(
            hf.transformer.h,
            hf.transformer.ln_f,
            "ln_1",
            "ln_2",
            "mlp",
            "attn.c_proj",
            {c: ("attn.c_attn", lambda h, i=i: slice(i * d + h * e, i * d + (h + 1) * e)) for i, c in enumerate("qkv")},
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
                c: ("attention.query_key_value", lambda h, i=i: slice(h * 3 * e + i * e, h * 3 * e + (i + 1) * e))
                for i, c in enumerate("qkv")
            },
            False,
        )
    e = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return Layout(
        hf.model.layers,
        hf.model.norm,
        "input_layernorm",
        "post_attention_layernorm",
        "mlp",
        "self_attn.o_proj",
        {c: (f"self_attn.{c}_proj", lambda h: slice(h * e, (h + 1) * e)) for c in "qkv"},
        False,
    )


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
            hook = lay.layers[0].register_forward_pre_hook(
                lambda m, a, k: store.__setitem__("out", _first_arg(a, k).clone()), with_kwargs=True
            )
        elif (match := re.fullmatch(r"a(\d+)\.h(\d+)", src)) is not None:
            layer, head = int(match[1]), int(match[2])
            proj = _module(lay.layers[layer], lay.out_proj)
            e = proj.weight.shape[0 if lay.out_proj_is_conv1d else 1] // self.n_heads
            columns = slice(head * e, (head + 1) * e)

            def record(module, args):
                z = args[0][..., columns]
                weight = module.weight[columns, :] if lay.out_proj_is_conv1d else module.weight[:, columns].T
                store["out"] = z @ weight

            hook = proj.register_forward_pre_hook(record)
        else:
            layer = int(re.fullmatch(r"m(\d+)", src)[1])
            mlp = _module(lay.layers[layer], lay.mlp)
            hook = mlp.register_forward_hook(lambda m, a, out: store.__setitem__("out", out.clone()))
        try:
            yield
        finally:
            hook.remove()

    @contextmanager
    def _rewrite_destination(self, dst: str, shift):
        """Replace destination ``dst``'s input stream x by x - shift() (shift is read lazily)."""
        lay = self.lay
        if dst == "logits" or re.fullmatch(r"m\d+", dst):
            norm = lay.final_norm if dst == "logits" else _module(lay.layers[int(dst[1:])], lay.mlp_norm)
            hooks = [norm.register_forward_pre_hook(lambda m, a: (a[0] - shift(),) + tuple(a[1:]))]
        else:
            match = re.fullmatch(r"a(\d+)\.h(\d+)<([qkv])>", dst)
            layer, head, which = int(match[1]), int(match[2]), match[3]
            block = lay.layers[layer]
            norm = _module(block, lay.attn_norm)
            path, columns = lay.projections[which]
            proj = _module(block, path)
            seen = {}

            def remember(module, args):
                seen["x"] = args[0]

            def replace(module, args, out):
                patched = module.forward(norm.forward(seen["x"] - shift()))
                out = out.clone()
                out[..., columns(head)] = patched[..., columns(head)]
                return out

            hooks = [norm.register_forward_pre_hook(remember), proj.register_forward_hook(replace)]
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
