"""What every architecture adapter provides, and the attention math they share.

An adapter reads a Hugging Face model's modules and weights in place (views,
never copies) and runs one layer with *per-destination* inputs: the query of
each head, the key and value of each key/value head and the MLP may each read
a different residual stream. Inputs carry a leading "destination" axis of
size 1 (all destinations read the same stream) or one entry per destination.
"""

from __future__ import annotations

import sys
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CircuitsError
from .norms import norm_factor

if TYPE_CHECKING:
    from .rules import RuleSet


@dataclass
class Context:
    """Per-batch state shared by all layers: the attention masks and rotary tables."""

    attention_mask: torch.Tensor  # bool [B, 1, T, T], True where a query may attend
    sliding_masks: dict[int, torch.Tensor]  # window size -> bool mask like attention_mask
    # (cos, sin), each [B, T, rotary_dim]; or one such pair per kind of layer (Gemma 3: local and global bases)
    rotary: Rotary


Rotary = tuple[torch.Tensor, torch.Tensor] | dict[str, tuple[torch.Tensor, torch.Tensor]] | None


def map_rotary(rotary: Rotary, function) -> Rotary:
    """``function`` applied to every table of ``rotary`` (a pair, a dict of pairs, or None)."""
    if rotary is None:
        return None
    if isinstance(rotary, dict):
        return {kind: tuple(function(table) for table in pair) for kind, pair in rotary.items()}
    return tuple(function(table) for table in rotary)


def per_head_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Project one input per head: x ``[n, B, T, D]``, weight ``[n, e, D]`` -> ``[B, n, T, e]``."""
    y = torch.einsum("nbtd,ned->bnte", x, weight)
    if bias is not None:
        y = y + bias[None, :, None, :]
    return y


def split_heads(y: torch.Tensor, n_heads: int) -> torch.Tensor:
    """``[B, T, n*e]`` -> ``[B, n, T, e]``."""
    batch, seq, _ = y.shape
    return y.view(batch, seq, n_heads, -1).transpose(1, 2)


def project_heads(part: torch.Tensor, linear: nn.Linear, n: int) -> torch.Tensor:
    """``n`` heads ``[B, n, T, e]`` of ``linear``'s output from ``part``: ``[1, B, T, D]`` (the shared stream: the
    fused projection) or ``[n, B, T, D]`` (head i reads input i: views of the weight)."""
    if part.shape[0] == 1:
        return split_heads(linear(part[0]), n)
    e = linear.out_features // n
    bias = None if linear.bias is None else linear.bias.view(n, e)
    return per_head_linear(part, linear.weight.view(n, e, linear.in_features), bias)


class Adapter(ABC):
    """Base class: subclasses set the structural fields and the module accessors."""

    # model_type -> the variants of it this adapter covers (what `circuits models` lists)
    model_types: dict[str, str] = {}
    # The config field that bounds the sequence length (learned positions, or the rotary models' declared
    # maximum); None, a missing field or 0 means no limit.
    position_limit: str | None = None
    # Does position t read only positions <= t (so a prompt's prefix is computed as if alone)?
    causal: bool = True
    # May the model's layers sit on different devices, or be offloaded (see ``circuits.placement``)?
    placeable: bool = True
    # A modified backward (GIM, RelP) while ``circuits.arch.rules.backward_rules`` runs, None otherwise
    backward_rules: RuleSet | None = None

    def __init__(self, hf: nn.Module):
        self.hf = hf
        self.config = hf.config
        self.n_layers: int
        self.n_heads: int
        self.n_kv_heads: int
        self.head_dim: int
        self.d_model: int
        self.parallel: bool = False

    # --- subclass hooks -------------------------------------------------------------
    @abstractmethod
    def embed(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """The ``input`` source: ``[B, T, D]``."""

    def rotary(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> Rotary:
        return None

    def qkv(self, layer: int, x: torch.Tensor, ctx: Context) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries ``[B, H, T, e]``, keys and values ``[B, G, T, e]`` from the attention inputs.

        ``x`` is ``[1, B, T, D]`` (shared) or ``[H + 2G, B, T, D]`` (q heads, k groups, v groups).
        """
        return self.project_qkv(layer, self.split_qkv_inputs(self.attention_norm(layer)(x)), ctx)

    @abstractmethod
    def attention_norm(self, layer: int) -> nn.Module:
        """The norm the attention inputs pass through before the q/k/v projections."""

    @abstractmethod
    def project_qkv(
        self, layer: int, parts: tuple[torch.Tensor, torch.Tensor, torch.Tensor], ctx: Context
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values from the normed inputs ``(q part, k part, v part)``: each ``[1, B, T, D]``
        (the shared stream: the fused projections) or ``[H, B, T, D]``, ``[G, ...]``, ``[G, ...]`` (one per head)."""

    def out_weight(self, layer: int) -> torch.Tensor:
        """The output projection as a per-head view ``[H, e, D]`` (of an ``nn.Linear``'s ``[D, H*e]`` weight)."""
        weight = self.out_projection(layer).weight
        return weight.view(self.d_model, self.n_heads, self.head_dim).permute(1, 2, 0)

    def out_bias(self, layer: int) -> torch.Tensor | None:
        """The attention output bias: a constant of the residual stream, owned by no node."""
        return self.out_projection(layer).bias

    @abstractmethod
    def out_projection(self, layer: int) -> nn.Module:
        """The HF output projection module (used when per-head outputs are not needed)."""

    @abstractmethod
    def mlp(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """The MLP source's output from its input stream (norm included), any leading shape."""

    @abstractmethod
    def final_norm(self) -> nn.Module:
        """The norm applied before the unembedding."""

    # Where an MLP's hidden units are: the module whose input they are (its output projection), by path in the layer
    mlp_hidden_paths: tuple[str, ...] = ("mlp.down_proj", "mlp.c_proj", "mlp.dense_4h_to_h", "mlp.fc2", "mlp.fc_out")

    def mlp_hidden_module(self, layer: int) -> nn.Module:
        """The module whose input is ``layer``'s MLP hidden units ``[B, T, d_mlp]`` (the ``mlp-neuron`` level)."""
        block = self.layer_module(layer)
        for path in self.mlp_hidden_paths:
            try:
                return block.get_submodule(path)
            except AttributeError:
                continue
        raise CircuitsError(
            f"{type(self).__name__}: layer {layer} has no MLP output projection at {', '.join(self.mlp_hidden_paths)};"
            " its hidden units cannot be resolved"
        )

    def mlp_width(self, layer: int) -> int:
        """How many hidden units ``layer``'s MLP has."""
        module = self.mlp_hidden_module(layer)
        if isinstance(module, nn.Linear):
            return module.in_features
        weight = getattr(module, "weight", None)  # GPT-2's Conv1D: [in, out]
        if weight is not None and weight.dim() == 2:
            return weight.shape[0]
        return self.hf.config.d_mlp  # circuits.native: an identity hook point

    def scale(self, layer: int) -> float:
        return self.head_dim**-0.5

    def window(self, layer: int) -> int | None:
        """Sliding-window size of this layer's attention, None for full causal attention."""
        return None

    # --- placement (models on several devices) -------------------------------------------
    def input_modules(self) -> list[nn.Module]:
        """The modules ``embed`` calls: their execution device is the model's input device."""
        return [self.hf.get_input_embeddings()]

    def layer_module(self, layer: int) -> nn.Module:
        """The module holding every weight of ``layer``: a device map places it whole."""
        return self.blocks[layer]

    # --- shared math -------------------------------------------------------------------
    @property
    def max_positions(self) -> int | None:
        """The longest sequence the model takes (its config's ``position_limit``), None when unbounded."""
        value = getattr(self.config, self.position_limit, None) if self.position_limit else None
        return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None

    def embedding_rows(self) -> int:
        """How many token ids the embedding accepts."""
        return self.hf.get_input_embeddings().num_embeddings

    def output_size(self) -> int:
        """How many logits the model outputs (the ids an answer may have)."""
        head = self.hf.get_output_embeddings()
        return getattr(head, "out_features", None) or self.config.vocab_size

    def unembed(self, x: torch.Tensor) -> torch.Tensor:
        return self.hf.get_output_embeddings()(self.final_norm()(x))

    def context(self, attention_mask: torch.Tensor, hidden: torch.Tensor, position_ids: torch.Tensor) -> Context:
        seq = attention_mask.shape[1]
        pos = torch.arange(seq, device=attention_mask.device)
        causal = pos[None, :] <= pos[:, None]  # [query, key]
        mask = causal[None, None] & attention_mask.bool()[:, None, None, :]
        windows = {w for w in (self.window(layer) for layer in range(self.n_layers)) if w is not None}
        sliding = {w: mask & (pos[None, :] > pos[:, None] - w)[None, None] for w in windows}
        return Context(mask, sliding, self.rotary(hidden, position_ids))

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: Context) -> torch.Tensor:
        """Scaled dot-product attention with GQA; returns per-head mixes ``z`` of shape ``[B, H, T, e]``.

        Families with soft-capped scores, an additive score bias (ALiBi) or sink logits take the written-out path,
        as does any family under backward rules (``circuits.arch.rules``: their softmax and q/k/v gradients).
        """
        window = self.window(layer)
        mask = ctx.attention_mask if window is None else ctx.sliding_masks[window]
        softcap, bias, sinks = self.score_softcap(layer), self.score_bias(layer, ctx), self.sink_logits(layer)
        q, k, v = self.attention_inputs(q, k, v)
        if softcap is None and bias is None and sinks is None and self.backward_rules is None:
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, scale=self.scale(layer), enable_gqa=self.n_kv_heads != self.n_heads
            )
        if self.n_kv_heads != self.n_heads:
            group = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        scores = (q @ k.transpose(-1, -2)).float() * self.scale(layer)  # [B, H, T, T]
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        if bias is not None:
            scores = scores + bias
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        if sinks is None:
            weights = self.softmax(scores)
        else:  # one more logit per head that takes probability mass and gives no value
            sink = sinks.float().view(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
            weights = self.softmax(torch.cat([scores, sink], -1))[..., :-1]
        return weights.to(v.dtype) @ v

    def softmax(self, scores: torch.Tensor) -> torch.Tensor:
        """The attention weights ``scores.softmax(-1)``; under backward rules, the rule's backward."""
        return scores.softmax(-1) if self.backward_rules is None else self.backward_rules.softmax(scores)

    def attention_inputs(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values as attention reads them; under backward rules, their gradients scaled."""
        return (q, k, v) if self.backward_rules is None else self.backward_rules.attention_inputs(q, k, v)

    def score_softcap(self, layer: int) -> float | None:
        """Attention scores pass through ``c * tanh(s / c)`` before the softmax (Gemma 2), None for none."""
        return None

    def score_bias(self, layer: int, ctx: Context) -> torch.Tensor | None:
        """An additive bias on the attention scores, broadcast to ``[B, H, T, T]`` (ALiBi), None for none."""
        return None

    def sink_logits(self, layer: int) -> torch.Tensor | None:
        """Per-head logits ``[H]`` of an attention sink in the softmax's denominator (gpt-oss), None for none."""
        return None

    def post_attention_norm(self, layer: int) -> nn.Module | None:
        """A norm applied to the attention output before it joins the stream (Gemma 2/3, OLMo 2), None for none.

        Heads write to the stream additively only through its per-position factor: each head's share is its
        output times the norm's factor at the layer's summed output (``circuits.arch.norms.norm_factor``).
        """
        return None

    def head_outputs(self, layer: int, z: torch.Tensor) -> torch.Tensor:
        """Each head's write to the residual stream, ``[H, B, T, D]`` (bias excluded)."""
        heads = torch.einsum("bhte,hed->hbtd", z, self.out_weight(layer))
        norm = self.post_attention_norm(layer)
        if norm is None:
            return heads
        if self.out_bias(layer) is not None:
            raise CircuitsError(
                f"model_type {self.config.model_type!r}: an attention output bias under a norm after attention "
                "belongs to no head; this combination is not supported"
            )
        factor = norm_factor(norm, heads.sum(0))
        if self.backward_rules is not None:  # frozen statistics: a constant factor
            factor = self.backward_rules.norm_factor(factor)
        return (heads * factor).to(heads.dtype)

    def attention_output(self, layer: int, z: torch.Tensor) -> torch.Tensor:
        """The summed attention output, bias included, as the HF module computes it."""
        batch, _, seq, _ = z.shape
        out = self.out_projection(layer)(z.transpose(1, 2).reshape(batch, seq, -1))
        norm = self.post_attention_norm(layer)
        return out if norm is None else norm(out)

    def qkv_counts(self) -> tuple[int, int, int]:
        """How many destinations read the q, k and v projections: heads, key/value groups, key/value groups."""
        return self.n_heads, self.n_kv_heads, self.n_kv_heads

    def split_qkv_inputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-destination attention inputs -> (q part, k part, v part)."""
        if x.shape[0] == 1:
            return x, x, x
        h, g = self.n_heads, self.n_kv_heads
        return x[:h], x[h : h + g], x[h + g :]


def rotary_function(module: nn.Module):
    """transformers' own ``apply_rotary_pos_emb`` from the module's modeling file."""
    return sys.modules[type(module).__module__].apply_rotary_pos_emb
