"""A naive, independent implementation of edge patching with plain PyTorch hooks.

It shares no code with the engine: it reads source outputs and rewrites one
destination's input on the unmodified HF model, using the HF modules' own
forward methods. Used as the oracle for the engine's invariants and for the
exact methods. The finer levels: an edge patched at some positions only, a
source's output dimensions patched for every reader (corrected where the source
joins the stream), and one MLP hidden unit (the input of the MLP's output
projection) patched.
"""

from __future__ import annotations

import re
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from types import SimpleNamespace

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
    # the MLP's output projection, per layer: its input is the MLP's hidden units (None: a mixture of experts,
    # which has no one set of hidden units); filled in by ``layout`` from ``MLP_HIDDEN``
    mlp_hidden: str | None = None


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


def _whole_projection_qk_norms(hf: nn.Module) -> dict:
    """OLMo 2 / OLMoE: q_norm and k_norm over the whole q and k projections, before heads are split."""
    cfg = hf.config
    e = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    norms = {"q": "self_attn.q_norm", "k": "self_attn.k_norm", "v": None}
    return {c: (f"self_attn.{c}_proj", lambda h: slice(h * e, (h + 1) * e), norms[c]) for c in "qkv"}


# Gemma 2/3: a norm on the attention output, and norms before and after the MLP (the MLP's write is the latter's)
_GEMMA_SANDWICH = dict(
    attn_post_norm="post_attention_layernorm",
    mlp_norm="pre_feedforward_layernorm",
    mlp_out="post_feedforward_layernorm",
)


def _separate_projections(attn: str, e: int) -> dict:
    """q/k/v from separate ``{attn}.{q,k,v}_proj`` modules, heads ``e`` columns wide (GPT-J, GPT-Neo, OPT)."""
    return {c: (f"{attn}.{c}_proj", lambda h: slice(h * e, (h + 1) * e), None) for c in "qkv"}


def _phi3_projections(hf: nn.Module) -> dict:
    """Phi-3's fused ``qkv_proj``: the rows of every query head, then of every key head, then of every value head."""
    cfg = hf.config
    e = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    offsets = {"q": 0, "k": cfg.num_attention_heads * e, "v": (cfg.num_attention_heads + cfg.num_key_value_heads) * e}
    rows = {c: lambda h, o=o: slice(o + h * e, o + (h + 1) * e) for c, o in offsets.items()}
    return {c: ("self_attn.qkv_proj", rows[c], None) for c in "qkv"}


def _gptj_like(hf: nn.Module, attn: str, mlp_norm: str) -> Layout:
    body, e = hf.transformer, hf.config.hidden_size // hf.config.num_attention_heads
    return Layout(body.h, body.ln_f, "ln_1", mlp_norm, "mlp", f"{attn}.out_proj", _separate_projections(attn, e))


def _grouped_fused(path: str, n_heads: int, n_groups: int, e: int) -> dict:
    """One fused q/k/v output laid out per key/value group: the group's query heads, then its key, then its value
    (one group per head: [q, k, v] per head; one group: [all queries | k | v])."""
    per = n_heads // n_groups

    def query(h):
        start = ((h // per) * (per + 2) + h % per) * e
        return slice(start, start + e)

    def key_value(offset):
        return lambda g: slice((g * (per + 2) + per + offset) * e, (g * (per + 2) + per + offset + 1) * e)

    return {"q": (path, query, None), "k": (path, key_value(0), None), "v": (path, key_value(1), None)}


def _head_dim(hf: nn.Module) -> int:
    return hf.config.hidden_size // hf.config.num_attention_heads


def _falcon(hf: nn.Module) -> Layout:
    cfg = hf.config
    h, e, new = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads, cfg.new_decoder_architecture
    groups = cfg.num_kv_heads if new else 1 if cfg.multi_query else h
    if new and cfg.num_ln_in_parallel_attn != 1:
        norms = ("ln_attn", "ln_mlp")
    elif new or cfg.parallel_attn:
        norms = ("input_layernorm", "input_layernorm")
    else:
        norms = ("input_layernorm", "post_attention_layernorm")
    qkv = _grouped_fused("self_attention.query_key_value", h, groups, e)
    return Layout(hf.transformer.h, hf.transformer.ln_f, *norms, "mlp", "self_attention.dense", qkv)


# model_type -> its layout, for the families that differ from the Llama family's
LAYOUTS = {
    "gemma2": lambda hf: llama_like(hf, **_GEMMA_SANDWICH),
    "gemma3_text": lambda hf: llama_like(hf, **_GEMMA_SANDWICH),
    # the multimodal Gemma 3 on text: its language model's layout
    "gemma3": lambda hf: llama_like(
        SimpleNamespace(config=hf.config.text_config, model=hf.model.language_model), **_GEMMA_SANDWICH
    ),
    "olmo2": lambda hf: llama_like(
        hf,
        attn_norm=None,
        mlp_norm=None,
        projections=_whole_projection_qk_norms(hf),
        attn_post_norm="post_attention_layernorm",
        mlp_out="post_feedforward_layernorm",
    ),
    "olmoe": lambda hf: llama_like(hf, projections=_whole_projection_qk_norms(hf)),
    "granite": lambda hf: llama_like(hf, residual_multiplier=hf.config.residual_multiplier),
    "cohere": lambda hf: llama_like(hf, mlp_norm="input_layernorm"),
    "stablelm": lambda hf: llama_like(
        hf, mlp_norm="input_layernorm" if hf.config.use_parallel_residual else "post_attention_layernorm"
    ),
    "phi": lambda hf: Layout(
        hf.model.layers,
        hf.model.final_layernorm,
        "input_layernorm",
        "input_layernorm",
        "mlp",
        "self_attn.dense",
        _separate_projections("self_attn", hf.config.hidden_size // hf.config.num_attention_heads),
    ),
    "phi3": lambda hf: llama_like(hf, projections=_phi3_projections(hf)),
    "gptj": lambda hf: _gptj_like(hf, "attn", mlp_norm="ln_1"),
    "gpt_neo": lambda hf: _gptj_like(hf, "attn.attention", mlp_norm="ln_2"),
    # the MLP is fc1/fc2 of the decoder layer, run on the flattened [B*T, D] stream
    "opt": lambda hf: Layout(
        hf.model.decoder.layers,
        hf.model.decoder.final_layer_norm,
        "self_attn_layer_norm",
        "final_layer_norm",
        "fc1",
        "self_attn.out_proj",
        _separate_projections("self_attn", hf.config.hidden_size // hf.config.num_attention_heads),
        mlp_out="fc2",
    ),
    "falcon": _falcon,
    # the MLP module adds the residual stream to its output: its write is dense_4h_to_h's output
    "bloom": lambda hf: Layout(
        hf.transformer.h,
        hf.transformer.ln_f,
        "input_layernorm",
        "post_attention_layernorm",
        "mlp",
        "self_attention.dense",
        _grouped_fused("self_attention.query_key_value", hf.config.n_head, hf.config.n_head, _head_dim(hf)),
        mlp_out="mlp.dense_4h_to_h",
    ),
    "gpt_bigcode": lambda hf: Layout(
        hf.transformer.h,
        hf.transformer.ln_f,
        "ln_1",
        "ln_2",
        "mlp",
        "attn.c_proj",
        _grouped_fused("attn.c_attn", hf.config.n_head, hf.config.num_key_value_heads, _head_dim(hf)),
    ),
}


# model_type -> the MLP output projection's path in a block, for the families whose isn't ``mlp.down_proj``
MLP_HIDDEN = {
    "gpt2": "mlp.c_proj",
    "gpt_bigcode": "mlp.c_proj",
    "gpt_neo": "mlp.c_proj",
    "starcoder2": "mlp.c_proj",
    "gpt_neox": "mlp.dense_4h_to_h",
    "falcon": "mlp.dense_4h_to_h",
    "bloom": "mlp.dense_4h_to_h",
    "gptj": "mlp.fc_out",
    "phi": "mlp.fc2",
    "opt": "fc2",  # OPT's MLP is fc1/fc2 of the decoder layer, on the flattened [B*T, D] stream
    # mixtures of experts: hidden units per expert, chosen per token
    "mixtral": None,
    "olmoe": None,
    "qwen2_moe": None,
    "qwen3_moe": None,
    "gpt_oss": None,
}


def layout(hf: nn.Module) -> Layout:
    lay = _family_layout(hf)
    lay.mlp_hidden = MLP_HIDDEN.get(hf.config.model_type, "mlp.down_proj")
    return lay


def _family_layout(hf: nn.Module) -> Layout:
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


def _with_first_arg(args, kwargs, value):
    """``(args, kwargs)`` with the first argument (positional, or the ``hidden_states`` keyword) replaced."""
    if args:
        return (value,) + tuple(args[1:]), kwargs
    return args, kwargs | {"hidden_states": value}


def _replace_output(out, value):
    """A module's output with its tensor (the first element of a tuple: MoE blocks) replaced by ``value``."""
    return (value,) + tuple(out[1:]) if isinstance(out, tuple) else value


def _output_tensor(out):
    return out[0] if isinstance(out, tuple) else out


class Oracle:
    """Patch one edge ``src->dst`` (``patch_edge``), one source's output dimensions (``patch_source``) or one
    MLP hidden unit (``patch_hidden``) of an HF model by hooks; each returns the logits."""

    def __init__(self, hf: nn.Module):
        self.hf, self.cfg, self.lay = hf, hf.config, layout(hf)
        text = getattr(self.cfg, "text_config", None) or self.cfg  # a multimodal model's language model
        self.n_heads = getattr(text, "num_attention_heads", None) or text.n_head

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

            def record_stream_shape(module, args, kwargs):
                store["shape"] = _first_arg(args, kwargs).shape

            def record_mlp(module, args, out):
                out = out[0] if isinstance(out, tuple) else out  # MoE blocks may return router logits too
                # in the stream's [B, T, D] shape (OPT runs its MLP on the flattened [B*T, D] stream)
                store["out"] = out.clone().reshape(store["shape"]) * lay.residual_multiplier

            hooks = [
                lay.layers[layer].register_forward_pre_hook(record_stream_shape, with_kwargs=True),
                mlp.register_forward_hook(record_mlp),
            ]
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
                patched = seen["x"] - shift().reshape(seen["x"].shape)  # OPT: the flattened stream
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
    def source_outputs(self, sources, input_ids, attention_mask) -> dict[str, torch.Tensor]:
        """Every source's output in one run of the HF model, by this oracle's hooks."""
        stores = {u: {} for u in sources}
        with ExitStack() as stack:
            for u in sources:
                stack.enter_context(self._capture_source(u, stores[u]))
            self.hf(input_ids, attention_mask=attention_mask)
        return {u: store["out"] for u, store in stores.items()}

    @torch.no_grad()
    def source_output(self, src: str, input_ids, attention_mask) -> torch.Tensor:
        store = {}
        with self._capture_source(src, store):
            self.hf(input_ids, attention_mask=attention_mask)
        return store["out"]

    @contextmanager
    def _correct_source(self, src: str, correction):
        """Subtract ``correction()`` ``[B, T, D]`` (read lazily) from source ``src``'s write to the stream, where
        it is written: every reader of the source sees the change."""
        lay = self.lay
        scale = lay.residual_multiplier  # the stream receives a module's output times this

        def corrected(out, divisor=1.0):
            tensor = _output_tensor(out)
            return _replace_output(out, tensor - (correction() / divisor).reshape(tensor.shape))

        if src == "input":  # the stream entering the first layer (what _capture_source records)

            def correct_input(module, args, kwargs):
                x = _first_arg(args, kwargs)
                return _with_first_arg(args, kwargs, x - correction().reshape(x.shape))

            hooks = [lay.layers[0].register_forward_pre_hook(correct_input, with_kwargs=True)]
        elif (match := re.fullmatch(r"a(\d+)\.h(\d+)", src)) is not None:
            block = lay.layers[int(match[1])]
            if lay.attn_post_norm is not None:  # the normed attention output is what joins the stream
                module, divisor = _module(block, lay.attn_post_norm), 1.0
            else:
                module, divisor = _module(block, lay.out_proj), scale
            hooks = [module.register_forward_hook(lambda m, a, out: corrected(out, divisor))]
        else:
            block = lay.layers[int(re.fullmatch(r"m(\d+)", src)[1])]
            mlp = _module(block, lay.mlp_out or lay.mlp)  # OPT: its output is the flattened [B*T, D] stream
            hooks = [mlp.register_forward_hook(lambda m, a, out: corrected(out, scale))]
        try:
            yield
        finally:
            for hook in hooks:
                hook.remove()

    def _hidden_module(self, layer: int) -> nn.Module:
        if self.lay.mlp_hidden is None:
            raise ValueError(f"{self.cfg.model_type}: a mixture of experts has no one set of MLP hidden units")
        return _module(self.lay.layers[layer], self.lay.mlp_hidden)

    @torch.no_grad()
    def hidden_units(self, layer: int, input_ids, attention_mask) -> torch.Tensor:
        """MLP ``layer``'s hidden units ``[B, T, d_mlp]`` in a run: the input of its output projection."""
        store = {}

        def record(module, args):
            store["h"] = args[0].clone()

        hook = self._hidden_module(layer).register_forward_pre_hook(record)
        try:
            self.hf(input_ids, attention_mask=attention_mask)
        finally:
            hook.remove()
        return store["h"].reshape(*input_ids.shape, -1)  # OPT: from the flattened [B*T, d_mlp]

    @torch.no_grad()
    def patch_hidden(
        self, layer: int, unit: int, clean_ids, attention_mask, value: torch.Tensor | None, weight: float = 0.0
    ) -> torch.Tensor:
        """Logits with MLP ``layer``'s hidden unit ``unit`` at mask value ``weight`` at every position: it reads
        ``value + weight * (h - value)`` (``value`` ``[B, T]``; None means zero)."""

        def replace(module, args):
            hidden = args[0].clone()
            patch = torch.zeros_like(hidden[..., unit]) if value is None else value.reshape(hidden.shape[:-1])
            hidden[..., unit] = patch + weight * (hidden[..., unit] - patch)
            return (hidden,) + tuple(args[1:])

        hook = self._hidden_module(layer).register_forward_pre_hook(replace)
        try:
            return self.hf(clean_ids, attention_mask=attention_mask).logits
        finally:
            hook.remove()

    @torch.no_grad()
    def patch_source(
        self, src: str, clean_ids, attention_mask, ablation: torch.Tensor | None, weight: torch.Tensor
    ) -> torch.Tensor:
        """Logits with source ``src``'s output dimensions at mask values ``weight`` ``[D]``: every reader of the
        source sees ``out + (1 - weight) * (ablation - out)``. ``ablation`` None means zero."""
        store = {}

        def correction():
            patch = torch.zeros_like(store["out"]) if ablation is None else ablation
            return (1 - weight) * (store["out"] - patch)

        with self._capture_source(src, store), self._correct_source(src, correction):
            return self.hf(clean_ids, attention_mask=attention_mask).logits

    @torch.no_grad()
    def patch_edge(
        self,
        edge: str,
        clean_ids,
        attention_mask,
        ablation: torch.Tensor | None,
        weight: float = 0.0,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits with ``edge`` at mask value ``weight``: its destination reads
        ``out + (1 - weight) * (ablation - out)`` from the source. ``ablation`` None means zero.
        ``positions`` ``[B, T]`` bool: only there (elsewhere the destination reads the source unchanged)."""
        src, dst = edge.split("->")
        store = {}

        def shift():
            patch = torch.zeros_like(store["out"]) if ablation is None else ablation
            delta = (1 - weight) * (store["out"] - patch)
            return delta if positions is None else delta * positions[..., None].to(delta.dtype)

        with self._capture_source(src, store), self._rewrite_destination(dst, shift):
            return self.hf(clean_ids, attention_mask=attention_mask).logits
