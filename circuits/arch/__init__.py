"""Architecture adapters, one per family, chosen by the HF config's ``model_type``."""

from __future__ import annotations

from torch import nn

from ..errors import CircuitsError
from .base import Adapter, Context
from .bigcode import GPTBigCodeAdapter
from .bloom import BloomAdapter
from .falcon import FalconAdapter
from .gemma import GemmaAdapter
from .gpt2 import GPT2Adapter
from .gptj import GPTJAdapter, GPTNeoAdapter
from .llama import LlamaAdapter
from .llama_variants import CohereAdapter, GraniteAdapter, StableLmAdapter
from .moe import GptOssAdapter, MoEAdapter
from .native import NativeAdapter
from .neox import NeoXAdapter
from .olmo import Olmo2Adapter, OlmoeAdapter
from .opt import OPTAdapter
from .phi import Phi3Adapter, PhiAdapter

ADAPTERS: dict[str, type[Adapter]] = {
    model_type: adapter
    for adapter in (
        GPT2Adapter,
        LlamaAdapter,
        NeoXAdapter,
        NativeAdapter,
        Olmo2Adapter,
        OlmoeAdapter,
        GraniteAdapter,
        CohereAdapter,
        StableLmAdapter,
        MoEAdapter,
        GptOssAdapter,
        GemmaAdapter,
        PhiAdapter,
        Phi3Adapter,
        GPTJAdapter,
        GPTNeoAdapter,
        OPTAdapter,
        FalconAdapter,
        BloomAdapter,
        GPTBigCodeAdapter,
    )
    for model_type in adapter.model_types
}


def supported_model_types() -> list[str]:
    return sorted(ADAPTERS)


def adapter_for(hf: nn.Module) -> Adapter:
    """The adapter for an HF causal LM; ValueError naming the model_type if unsupported."""
    model_type = getattr(getattr(hf, "config", None), "model_type", None)
    if model_type not in ADAPTERS:
        raise CircuitsError(
            f"unsupported architecture: model_type {model_type!r}; supported model types: "
            + ", ".join(supported_model_types())
        )
    if hf.get_output_embeddings() is None:
        raise CircuitsError(
            f"{type(hf).__name__} has no language-model head; load it with AutoModelForCausalLM "
            "(circuits needs the logits)"
        )
    return ADAPTERS[model_type](hf)


__all__ = ["ADAPTERS", "Adapter", "Context", "adapter_for", "supported_model_types"]
