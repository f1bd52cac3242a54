"""OLMo 2 and OLMoE: Llama-shaped, with RMSNorms over the WHOLE q and k projections (all heads together, before
the head split).

With one input per destination, head h's query is head h's block of ``q_norm(q_proj(x_h))``: the norm's scale
depends on every head's projection of head h's own input (``whole_norm_heads``).

- OLMo 2: no pre-norms (the projections and the MLP read the stream), a norm after attention
  (``post_attention_layernorm``, each head's share by the norm's per-position factor) and after the MLP
  (``post_feedforward_layernorm``, part of the MLP node).
- OLMoE: pre-norms as Llama, q/k/v optionally clipped to +-``clip_qkv`` after the norms, a sparse mixture of
  experts as the MLP: one node, the block's own routed module (top-k routing included).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import CircuitsError
from .base import Context, project_heads, split_heads
from .llama import LlamaAdapter
from .moe import MoEAdapter


def whole_norm_heads(part: torch.Tensor, linear: nn.Linear, n: int, norm: nn.Module) -> torch.Tensor:
    """``n`` heads ``[B, n, T, e]`` of ``norm(linear(.))``, ``norm`` an RMSNorm (``w * y / rms(y)``) over the whole
    projection, from ``part``: ``[1, B, T, D]`` (the shared stream) or ``[n, B, T, D]`` (head i reads input i).

    One input per head: head i is head i's block of ``norm(linear(input i))``, every head's full projection of
    each input. When those inputs are one stream seen n times (a stride-0 view: the engine's shared stream whose
    backward gives each head its own gradient), the projection is computed once; the norm's mean square for head
    i is written as its value plus its first-order change in input i (``2/N <W^T y, dx_i>``, zero in value), which
    gives the exact value and the exact gradient in each head's input without n full projections.
    """
    if part.shape[0] == 1:
        return split_heads(norm(linear(part[0])), n)
    if part.stride(0) != 0:
        y = norm(linear(part))  # [n, B, T, n * e]: every head's full projection of its own input
        return torch.diagonal(y.unflatten(-1, (n, -1)), dim1=0, dim2=3).permute(0, 3, 1, 2)  # head i of input i
    heads = project_heads(part, linear, n)  # [B, n, T, e]: head i from input i, the same values as linear(x)
    y = heads.detach().float().transpose(1, 2).flatten(2)  # [B, T, N]
    direction = y @ linear.weight.detach().float()  # [B, T, D]: N/2 times the mean square's gradient in x
    change = ((part - part.detach()).float() * direction).sum(-1).transpose(0, 1)  # [B, n, T]: 0, that gradient
    mean_square = y.pow(2).mean(-1).unsqueeze(1) + change * (2 / y.shape[-1])
    scaled = heads.float() * torch.rsqrt(mean_square + norm.variance_epsilon).unsqueeze(-1)
    return (norm.weight.view(n, 1, -1) * scaled).to(heads.dtype)


class _WholeProjectionQKNorm(LlamaAdapter):
    def project_qkv(self, layer: int, parts: tuple[torch.Tensor, torch.Tensor, torch.Tensor], ctx: Context):
        attn = self.blocks[layer].self_attn
        (q_part, k_part, v_part), (n_q, n_kv, _) = parts, self.qkv_counts()
        q = whole_norm_heads(q_part, attn.q_proj, n_q, attn.q_norm)
        k = whole_norm_heads(k_part, attn.k_proj, n_kv, attn.k_norm)
        v = project_heads(v_part, attn.v_proj, n_kv)
        clip = getattr(self.config, "clip_qkv", None)
        if clip is not None:  # OLMoE: elementwise, after the norms
            q, k, v = (x.clamp(-clip, clip) for x in (q, k, v))
        cos, sin = ctx.rotary
        return (*self._apply_rotary(q, k, cos, sin), v)


class Olmo2Adapter(_WholeProjectionQKNorm):
    model_types = {"olmo2": "OLMo 2 (norms after attention and MLP, q/k RMSNorms over the whole projections)"}

    def __init__(self, hf: nn.Module):
        super().__init__(hf)
        if self.config.attention_bias:
            raise CircuitsError(
                "model_type 'olmo2' with attention_bias=True: the output projection's bias passes through "
                "post_attention_layernorm with the heads, so its share of the normed output changes with every head "
                "and belongs to no node; this configuration is not supported"
            )
        self._identity = nn.Identity()

    def attention_norm(self, layer: int) -> nn.Module:
        return self._identity

    def post_attention_norm(self, layer: int) -> nn.Module | None:
        return self.blocks[layer].post_attention_layernorm

    def mlp(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        block = self.blocks[layer]
        return block.post_feedforward_layernorm(block.mlp(x))


class OlmoeAdapter(_WholeProjectionQKNorm, MoEAdapter):
    model_types = {
        "olmoe": "OLMoE (top-k routed experts as one MLP node, q/k RMSNorms over the whole projections, "
        "q/k/v clipped to +-clip_qkv if set)"
    }
