"""GPT-J and GPT-Neo (``transformer.h``, ``wte``, ``ln_1``/``ln_f``, q/k/v and ``out_proj`` without q/k/v biases).

- GPT-J: parallel block (``ln_1`` feeds attention and MLP), no learned positions, interleaved rotary ("rotate
  every two") on the first ``rotary_dim`` dimensions of each head, no output bias, ``lm_head`` with a bias.
- GPT-Neo: sequential block, learned positions (``wte + wpe``), unscaled attention (scale 1.0), layers of
  ``attention_layers`` "local" attend within ``window_size`` positions, ``out_proj`` with a bias.

GPT-Neo's attention computes its scores and softmax in float32 whatever the model's dtype; so does its adapter
in half precision. GPT-J's default (sdpa) attention computes in the model's dtype (its eager path in float32).

``SeparateQKV`` is shared with Phi and OPT: separate ``nn.Linear`` q/k/v projections and a Linear output
projection.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import Adapter, Context, project_heads, rotary_function


class SeparateQKV:
    """Mixin: q/k/v from separate ``q_proj``/``k_proj``/``v_proj`` Linears (biases or not) of ``attention(layer)``,
    then ``after_projection`` (rotary positions, q/k norms, q scaling); heads write through ``out_projection``."""

    def attention(self, layer: int) -> nn.Module:
        return self.blocks[layer].self_attn

    def after_projection(self, layer: int, q, k, v, ctx: Context):
        return q, k, v

    def project_qkv(self, layer: int, parts: tuple[torch.Tensor, torch.Tensor, torch.Tensor], ctx: Context):
        attn = self.attention(layer)
        projections = (attn.q_proj, attn.k_proj, attn.v_proj)
        q, k, v = (project_heads(part, p, n) for part, p, n in zip(parts, projections, self.qkv_counts(), strict=True))
        return self.after_projection(layer, q, k, v, ctx)


class GPTNeoAdapter(SeparateQKV, Adapter):
    model_types = {"gpt_neo": "GPT-Neo (learned positions, local attention layers, unscaled attention)"}
    position_limit = "max_position_embeddings"

    def __init__(self, hf: nn.Module):
        super().__init__(hf)
        self.body = hf.transformer
        self.blocks = self.body.h
        cfg = self.config
        self.n_layers, self.n_heads = cfg.num_hidden_layers, cfg.num_attention_heads
        self.n_kv_heads = self.n_heads
        self.d_model = cfg.hidden_size
        self.head_dim = self.d_model // self.n_heads

    def embed(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return self.body.wte(input_ids) + self.body.wpe(position_ids)

    def input_modules(self) -> list[nn.Module]:
        return [self.body.wte, self.body.wpe]

    def attention(self, layer: int) -> nn.Module:
        return self.blocks[layer].attn.attention

    def attention_norm(self, layer: int) -> nn.Module:
        return self.blocks[layer].ln_1

    def scale(self, layer: int) -> float:
        return 1.0

    def window(self, layer: int) -> int | None:
        return self.config.window_size if self.config.attention_layers[layer] == "local" else None

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: Context) -> torch.Tensor:
        if q.dtype not in (torch.float16, torch.bfloat16):
            return super().attend(layer, q, k, v, ctx)
        # half precision: scores and softmax in float32, the weights back in the model's dtype, as HF computes them
        mask = ctx.attention_mask if self.window(layer) is None else ctx.sliding_masks[self.window(layer)]
        q, k, v = self.attention_inputs(q, k, v)
        scores = (q.float() @ k.float().transpose(-1, -2)) * self.scale(layer)
        weights = self.softmax(scores.masked_fill(~mask, torch.finfo(scores.dtype).min))
        return weights.to(v.dtype) @ v

    def out_projection(self, layer: int) -> nn.Module:
        return self.attention(layer).out_proj

    def mlp(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        block = self.blocks[layer]
        return block.mlp(block.ln_2(x))

    def final_norm(self) -> nn.Module:
        return self.body.ln_f


class GPTJAdapter(GPTNeoAdapter):
    model_types = {"gptj": "GPT-J (parallel block, interleaved rotary on the first rotary_dim dimensions)"}
    position_limit = "n_positions"

    def __init__(self, hf: nn.Module):
        super().__init__(hf)
        self.parallel = True
        self.rotary_dim = self.config.rotary_dim or self.head_dim
        self._apply_rotary = rotary_function(self.blocks[0].attn)  # (x [B, T, H, r], sin, cos): every two

    def embed(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return self.body.wte(input_ids)

    def input_modules(self) -> list[nn.Module]:
        return [self.body.wte]

    def rotary(self, hidden: torch.Tensor, position_ids: torch.Tensor):
        return self.body.rotary_emb(hidden, position_ids)  # (sin, cos), each [B, T, rotary_dim / 2]

    def attention(self, layer: int) -> nn.Module:
        return self.blocks[layer].attn

    def after_projection(self, layer: int, q, k, v, ctx: Context):
        sin, cos = ctx.rotary
        r = self.rotary_dim

        def rotate(x):  # [B, n, T, e]; the HF function takes [B, T, n, r]
            turned = self._apply_rotary(x[..., :r].transpose(1, 2), sin, cos).transpose(1, 2)
            return torch.cat([turned, x[..., r:]], -1)

        return rotate(q), rotate(k), v

    def scale(self, layer: int) -> float:
        return self.attention(layer).scaling

    attend = Adapter.attend  # transformers' default (sdpa) computes GPT-J's scores in the model's dtype

    def window(self, layer: int) -> int | None:
        return None

    def mlp(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        block = self.blocks[layer]
        return block.mlp(block.ln_1(x))
