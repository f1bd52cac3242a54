"""A small transformer defined here, for models that are no Hugging Face class.

Compiled (tracr) and trained toy models with known circuits use it. Blocks are
sequential, ``x = x + attn(ln1(x)); x = x + mlp(ln2(x))``, with per-head weight
tensors (``W_Q[h]`` is head h's ``[d_model, d_head]`` query map), optional
LayerNorm (none at all for compiled models), causal or bidirectional
attention, ReLU MLPs or none (``d_mlp = 0``: attention-only blocks), learned
absolute positions or none, and an own unembedding ``W_U``.

Attention-only models keep their MLP nodes in the edge graph: ``mL`` is a
node whose output is exactly zero, so every edge into or out of it scores
exactly 0 under every method (see ``circuits.arch.native``).

A model saves to a directory as ``config.json`` plus ``model.safetensors``;
``NativeTransformer.load`` and ``circuits.load_model`` read it back.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import nn

from .errors import CircuitsError
from .io import atomic_write_bytes, atomic_write_text

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
LAYER_NORM_EPS = 1e-5


@dataclass
class NativeConfig:
    """The shape of a ``NativeTransformer``. Bad values raise CircuitsError (a ValueError) naming the field."""

    vocab_size: int
    n_layers: int
    d_model: int
    n_heads: int
    d_head: int
    d_mlp: int = 0  # 0 = attention-only blocks (the graph keeps MLP nodes whose output is zero)
    n_positions: int = 0  # 0 = no positional embedding; else learned absolute positions
    layer_norm: bool = False  # False = no norms at all (compiled models)
    causal: bool = True  # False = bidirectional attention (padding is still masked)
    attn_scale: float | None = None  # None = d_head ** -0.5
    d_vocab_out: int | None = None  # unembedding output size; None = vocab_size
    model_type: ClassVar[str] = "circuits-native"

    def __post_init__(self) -> None:
        for name, low in (("vocab_size", 1), ("n_layers", 1), ("d_model", 1), ("n_heads", 1), ("d_head", 1)):
            _check_int(name, getattr(self, name), low)
        _check_int("d_mlp", self.d_mlp, 0)
        _check_int("n_positions", self.n_positions, 0)
        for name in ("layer_norm", "causal"):
            if not isinstance(getattr(self, name), bool):
                raise CircuitsError(f"NativeConfig.{name} must be true or false, got {getattr(self, name)!r}")
        if self.attn_scale is not None:
            scale = self.attn_scale
            if isinstance(scale, bool) or not isinstance(scale, int | float) or not math.isfinite(scale) or scale <= 0:
                raise CircuitsError(f"NativeConfig.attn_scale must be a positive number or None, got {scale!r}")
            self.attn_scale = float(scale)
        if self.d_vocab_out is not None:
            _check_int("d_vocab_out", self.d_vocab_out, 1)

    @property
    def scale(self) -> float:
        """The attention logit scale."""
        return self.d_head**-0.5 if self.attn_scale is None else self.attn_scale

    @property
    def vocab_out(self) -> int:
        """How many logits the model outputs."""
        return self.vocab_size if self.d_vocab_out is None else self.d_vocab_out

    def to_dict(self) -> dict[str, Any]:
        """The fields plus ``model_type`` (what ``config.json`` holds)."""
        return {"model_type": self.model_type, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NativeConfig:
        """The config from ``to_dict``'s output; unknown keys or a foreign ``model_type`` are errors."""
        if not isinstance(data, dict):
            raise CircuitsError(f"a native config must be a JSON object, got {type(data).__name__}")
        data = dict(data)
        model_type = data.pop("model_type", cls.model_type)
        if model_type != cls.model_type:
            raise CircuitsError(f"config model_type is {model_type!r}, not {cls.model_type!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise CircuitsError(f"unknown NativeConfig field {unknown[0]!r}; fields: {', '.join(sorted(known))}")
        missing = [f.name for f in fields(cls) if f.default is MISSING and f.name not in data]
        if missing:
            raise CircuitsError(f"NativeConfig field {missing[0]!r} is missing")
        return cls(**data)


def _check_int(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise CircuitsError(f"NativeConfig.{name} must be an integer >= {low}, got {value!r}")


@dataclass
class NativeOutput:
    """What ``NativeTransformer.forward`` returns (HF-like: ``.logits``)."""

    logits: torch.Tensor  # [B, T, d_vocab_out]


class Attention(nn.Module):
    """Multi-head attention with per-head weights ``W_Q/W_K/W_V [H, D, e]`` and ``W_O [H, e, D]``."""

    def __init__(self, config: NativeConfig):
        super().__init__()
        h, d, e = config.n_heads, config.d_model, config.d_head
        self.W_Q = nn.Parameter(torch.empty(h, d, e))
        self.W_K = nn.Parameter(torch.empty(h, d, e))
        self.W_V = nn.Parameter(torch.empty(h, d, e))
        self.b_Q = nn.Parameter(torch.zeros(h, e))
        self.b_K = nn.Parameter(torch.zeros(h, e))
        self.b_V = nn.Parameter(torch.zeros(h, e))
        self.W_O = nn.Parameter(torch.empty(h, e, d))
        self.b_O = nn.Parameter(torch.zeros(d))
        self.scale = config.scale

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """``x [B, T, D]``, ``allowed`` bool ``[B, 1, T, T]`` (query, key) -> ``[B, T, D]``."""
        q = torch.einsum("btd,hde->bhte", x, self.W_Q) + self.b_Q[None, :, None]
        k = torch.einsum("btd,hde->bhte", x, self.W_K) + self.b_K[None, :, None]
        v = torch.einsum("btd,hde->bhte", x, self.W_V) + self.b_V[None, :, None]
        scores = torch.einsum("bhqe,bhke->bhqk", q, k) * self.scale
        pattern = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        z = torch.einsum("bhqk,bhke->bhqe", pattern, v)
        return torch.einsum("bhte,hed->btd", z, self.W_O) + self.b_O


class MLP(nn.Module):
    """``relu(x W_in + b_in) W_out + b_out``."""

    def __init__(self, config: NativeConfig):
        super().__init__()
        self.W_in = nn.Parameter(torch.empty(config.d_model, config.d_mlp))
        self.b_in = nn.Parameter(torch.zeros(config.d_mlp))
        self.W_out = nn.Parameter(torch.empty(config.d_mlp, config.d_model))
        self.b_out = nn.Parameter(torch.zeros(config.d_model))
        self.hidden = nn.Identity()  # its input is the hidden units: where a hook reads or patches them

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.hidden(F.relu(x @ self.W_in + self.b_in)) @ self.W_out + self.b_out


def _norm(config: NativeConfig) -> nn.Module:
    return nn.LayerNorm(config.d_model, eps=LAYER_NORM_EPS) if config.layer_norm else nn.Identity()


class Block(nn.Module):
    """One sequential block; ``mlp`` is None in attention-only models."""

    def __init__(self, config: NativeConfig):
        super().__init__()
        self.ln1 = _norm(config)
        self.attn = Attention(config)
        self.ln2 = _norm(config)
        self.mlp = MLP(config) if config.d_mlp > 0 else None

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), allowed)
        if self.mlp is not None:
            x = x + self.mlp(self.ln2(x))
        return x


class NativeTransformer(nn.Module):
    """The native model, with the HF-like surface ``circuits.Model`` needs (``config``, embeddings, ``.logits``).

    Weights are initialised from ``torch``'s global generator (normal, std 0.02 for matrices and
    embeddings, zero biases, unit norms); set them directly for compiled models.
    """

    def __init__(self, config: NativeConfig):
        super().__init__()
        if not isinstance(config, NativeConfig):
            raise CircuitsError(f"NativeTransformer needs a NativeConfig, got {type(config).__name__}")
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_embed = nn.Embedding(config.n_positions, config.d_model) if config.n_positions else None
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.ln_final = _norm(config)
        self.W_U = nn.Parameter(torch.empty(config.d_model, config.vocab_out))
        self.b_U = nn.Parameter(torch.zeros(config.vocab_out))
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        """Matrices and embeddings ~ N(0, std), biases 0, LayerNorms to identity."""
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, nn.LayerNorm):
                    module.reset_parameters()
                    continue
                for name, parameter in module.named_parameters(recurse=False):
                    if name.startswith("b_"):
                        parameter.zero_()
                    else:
                        parameter.normal_(0.0, std)

    # --- the HF-like surface ----------------------------------------------------------
    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed

    def get_output_embeddings(self):
        """The unembedding as a callable ``[..., D] -> [..., V]`` (``W_U`` and ``b_U`` are parameters of the model)."""
        return self.unembed

    def unembed(self, x: torch.Tensor) -> torch.Tensor:
        """Logits from final-normed residual streams."""
        return x @ self.W_U + self.b_U

    def embed_tokens(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Token plus position embeddings, ``[B, T, D]``; ValueError past ``n_positions``."""
        x = self.embed(input_ids)
        if self.pos_embed is not None:
            if input_ids.shape[-1] > self.config.n_positions:
                raise CircuitsError(
                    f"sequence length {input_ids.shape[-1]} exceeds the model's n_positions ({self.config.n_positions})"
                )
            x = x + self.pos_embed(position_ids)
        return x

    def allowed(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """Bool ``[B, 1, T, T]``: query t may attend to key s (a real key, and s <= t when causal)."""
        seq = attention_mask.shape[1]
        allowed = attention_mask.bool()[:, None, None, :].expand(-1, 1, seq, seq)
        if self.config.causal:
            pos = torch.arange(seq, device=attention_mask.device)
            allowed = allowed & (pos[None, :] <= pos[:, None])[None, None]
        return allowed

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> NativeOutput:
        """Logits ``[B, T, d_vocab_out]`` for right-padded ``input_ids [B, T]``."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        x = self.embed_tokens(input_ids, position_ids)
        allowed = self.allowed(attention_mask)
        for block in self.blocks:
            x = block(x, allowed)
        return NativeOutput(self.unembed(self.ln_final(x)))

    # --- files -----------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``config.json`` and ``model.safetensors`` into ``directory`` (each atomically)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {name: tensor.detach().contiguous().cpu() for name, tensor in self.state_dict().items()}
        metadata = {"format": "pt", "model_type": self.config.model_type}
        atomic_write_bytes(directory / WEIGHTS_FILE, safetensors_bytes(tensors, metadata=metadata))
        atomic_write_text(directory / CONFIG_FILE, json.dumps(self.config.to_dict(), indent=2) + "\n")
        return directory

    @classmethod
    def load(
        cls, directory: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
    ) -> NativeTransformer:
        """A model saved by ``save``, in eval mode; ValueError for missing files, bad configs or weights."""
        directory = Path(directory)
        config = read_config(directory)
        weights_path = directory / WEIGHTS_FILE
        if not weights_path.is_file():
            raise CircuitsError(f"{directory} has no {WEIGHTS_FILE}")
        check_safetensors(weights_path)
        try:
            tensors = load_file(weights_path)
        except Exception as error:  # safetensors raises its own error types
            raise CircuitsError(f"{weights_path}: unreadable weights ({error})") from None
        model = cls(config)
        expected = model.state_dict()
        missing = sorted(set(expected) - set(tensors))
        unexpected = sorted(set(tensors) - set(expected))
        if missing or unexpected:
            which = f"missing tensor {missing[0]!r}" if missing else f"unexpected tensor {unexpected[0]!r}"
            raise CircuitsError(f"{weights_path} does not match its config: {which}")
        for name, tensor in tensors.items():
            if tensor.shape != expected[name].shape:
                raise CircuitsError(
                    f"{weights_path}: tensor {name!r} has shape {list(tensor.shape)}, "
                    f"the config needs {list(expected[name].shape)}"
                )
        model.load_state_dict(tensors)
        return model.to(device=device, dtype=dtype).eval()


def check_safetensors(path: str | os.PathLike) -> None:
    """A CircuitsError naming ``path`` unless it is a complete safetensors file (its header read, its size
    checked against the header: an empty, truncated or damaged file is found without loading any tensor)."""
    path = Path(path)
    try:
        with safe_open(path, framework="pt"):
            pass
    except Exception as error:  # safetensors raises its own error types
        empty = path.is_file() and path.stat().st_size == 0
        reason = "the file is empty" if empty else (str(error).splitlines() or [type(error).__name__])[0]
        raise CircuitsError(
            f"{path}: not a complete safetensors file ({reason}); it may be truncated: save or copy it again"
        ) from None


def read_config(directory: str | os.PathLike) -> NativeConfig:
    """The ``NativeConfig`` in ``directory/config.json``."""
    path = Path(directory) / CONFIG_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CircuitsError(f"cannot read native config {path}: {error}") from None
    try:
        return NativeConfig.from_dict(data)
    except ValueError as error:
        raise CircuitsError(f"{path}: {error}") from None


def is_native_directory(directory: str | os.PathLike) -> bool:
    """True when ``directory/config.json`` declares ``model_type`` ``circuits-native``."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        return False
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and data.get("model_type") == NativeConfig.model_type
