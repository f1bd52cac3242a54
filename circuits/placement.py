"""Where each layer runs when a model sits on several devices (accelerate device maps, CPU or disk offload).

The engine calls a model's submodules itself (the embedding, each layer's norms, projections and MLP, the
unembedding) and reads some weights directly (per-head projections), never a block's ``forward``: the hooks
accelerate puts on blocks (load offloaded weights onto the execution device, move inputs there) do not fire.
Placement is therefore the engine's job:

- the engine's state (residual stream, the sources' deltas, patch values, kept outputs, the gradients a
  method receives) lives on the *input device*, the embedding's execution device (``Model.device``);
- a layer on another device, or with offloaded weights, runs inside its ``Stage``: every accelerate hook
  in the block runs its ``pre_forward`` first (offloaded weights are loaded onto the execution device) and
  is silenced while the engine computes the layer (each weight is loaded once, and none is freed halfway),
  then runs its ``post_forward`` (offloaded weights are freed); the layer's inputs (the destinations' reads,
  the masks and rotary tables) are moved to its device and its outputs (head and MLP outputs) back;
- whole modules the engine calls as such (embedding, rotary table, final norm, unembedding) keep their own
  hooks, which move their inputs and load their weights as in the model's own forward.

A model on one device without offloaded weights has no placement (``None``): the engine runs it exactly as
before, without a single copy.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from .arch import Adapter, Context
from .arch.base import map_rotary
from .errors import CircuitsError


class Stage:
    """One layer that runs on a device other than the input device, or whose weights are offloaded.

    A context manager: inside it the layer's weights sit on ``device`` and its hooks are silent.
    """

    def __init__(self, device: torch.device, hooked: list[tuple[nn.Module, object]], loaders: list[tuple]):
        self.device = device
        self.hooked = hooked  # (module, hook) for every hooked module of the block: run by the engine
        self.loaders = loaders  # (module, hook) for offloading hooks on the block's ancestors
        self.offloaded = any(_offloads(hook) for _, hook in hooked + loaders)
        self.saving = None  # while inside, under autograd: the saved-tensor hooks
        self.frozen: list[tuple[nn.Module, str]] = []  # and the parameters that stopped requiring grad

    def move(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` on this stage's device (gradients flow back). An expanded view (the same stream read by
        several destinations, each with a gradient of its own) moves its one stream, not n copies."""
        if x.device == self.device:  # an offloaded layer on the input device
            return x
        if x.dim() and x.shape[0] > 1 and x.stride(0) == 0:
            return _MoveExpanded.apply(x, self.device)
        return x.to(self.device)

    def __enter__(self) -> Stage:
        pairs = self.loaders + self.hooked
        done = 0
        try:
            for module, hook in pairs:
                hook.pre_forward(module)  # an offloading hook loads the module's weights onto its device
                done += 1
                if done > len(self.loaders):
                    module._hf_hook = _silent_hook()  # accelerate's forward wrapper reads the hook at each call
            if self.offloaded and torch.is_grad_enabled():
                self._keep_for_backward_by_reloading(pairs)
        except BaseException:
            self._release(pairs[:done])
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._release(self.loaders + self.hooked)

    def _keep_for_backward_by_reloading(self, pairs: list[tuple]) -> None:
        """Under autograd, keep no offloaded weight alive until backward (that would gather every offloaded layer
        on the execution device): the loaded weights stop requiring grad (no graph node holds them; the engine
        never needs weight gradients), and a saved tensor that is one of them, or a view, is saved as the way
        to reload it."""
        loaded = _loaded_weights(pairs)
        self.frozen = [(module, name) for module, name, weight, _ in loaded if weight.requires_grad]
        for _, _, weight, _ in loaded:
            weight.requires_grad_(False)
        self.saving = torch.autograd.graph.saved_tensors_hooks(*_reloading(loaded))
        self.saving.__enter__()

    def _release(self, pairs: list[tuple]) -> None:
        if self.saving is not None:
            self.saving.__exit__(None, None, None)
            self.saving = None
        for module, hook in reversed(pairs):
            module._hf_hook = hook
            hook.post_forward(module, None)  # an offloading hook frees the weights it loaded
        for module, name in self.frozen:  # the offloaded (meta) parameters require grad again, as before
            module.get_parameter(name).requires_grad_(True)
        self.frozen = []


def _loaded_weights(pairs: list[tuple]) -> list[tuple[nn.Module, str, torch.Tensor, object]]:
    """(module, name, tensor, weights map) of every weight the offloading hooks among ``pairs`` have loaded."""
    from accelerate.utils import named_module_tensors

    loaded = []
    for module, hook in pairs:
        for h in _hooks(hook):
            if _is_align(h) and h.offload:
                tensors = named_module_tensors(
                    module, include_buffers=h.offload_buffers, recurse=h.place_submodules, remove_non_persistent=True
                )
                loaded += [(module, name, t, h.weights_map) for name, t in tensors if t.device.type != "meta"]
    return loaded


def _reloading(loaded: list[tuple]) -> tuple:
    """Saved-tensor hooks: a saved tensor whose storage is a loaded weight's is saved as a ``_Reload``. (The
    graph keeps the hooks: they hold no weight, only where each is from.)"""
    storages = {
        weight.untyped_storage().data_ptr(): (weights, name, weight.dtype, weight.device, weight.storage_offset())
        for _, name, weight, weights in loaded
        if weight.untyped_storage().data_ptr()
    }

    def pack(tensor: torch.Tensor):
        found = storages.get(tensor.untyped_storage().data_ptr()) if tensor.device.type != "meta" else None
        if found is None:
            return tensor
        weights, name, dtype, device, start = found
        return _Reload(
            weights, name, dtype, device, tuple(tensor.shape), tensor.stride(), tensor.storage_offset() - start
        )

    def unpack(saved):
        return saved.load() if isinstance(saved, _Reload) else saved

    return pack, unpack


@dataclass(frozen=True)
class _Reload:
    """An offloaded weight (or a view of it) saved for backward by where to reload it from."""

    weights: object  # accelerate's weights map of the hook that loaded it
    name: str
    dtype: torch.dtype
    device: torch.device
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int  # from the weight's own storage offset

    def load(self) -> torch.Tensor:
        weight = self.weights[self.name].to(device=self.device, dtype=self.dtype)
        return weight.as_strided(self.shape, self.stride, weight.storage_offset() + self.offset)


class _MoveExpanded(torch.autograd.Function):
    """``x.expand(n, ...)`` moved as one stream and expanded again; the gradient keeps its n rows."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, device: torch.device) -> torch.Tensor:
        ctx.source = x.device
        return x[:1].to(device).expand_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.to(ctx.source), None


class Placement:
    """The input device and, per layer, the ``Stage`` it runs in (None: on the input device, nothing offloaded)."""

    def __init__(self, home: torch.device, layers: list[Stage | None], output: torch.device, devices: list[str]):
        self.home = home
        self.layers = layers
        self.output = output  # where the final norm runs
        self.devices = devices  # every execution device, for display

    def home_tensor(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.home)

    def unembed(self, adapter: Adapter, final: torch.Tensor) -> torch.Tensor:
        """Logits on the input device from the final stream (the norm's and head's own hooks place them)."""
        return adapter.unembed(final.to(self.output)).to(self.home)

    def describe(self) -> str:
        offloaded = sum(stage is not None and stage.offloaded for stage in self.layers)
        text = f"{self.home} (input), layers on {', '.join(self.devices)}"
        return text + (f", {offloaded} layer(s) offloaded" if offloaded else "")


def move_context(ctx: Context, device: torch.device) -> Context:
    """The batch's masks and rotary tables on ``device``."""
    return Context(
        ctx.attention_mask.to(device),
        {w: m.to(device) for w, m in ctx.sliding_masks.items()},
        map_rotary(ctx.rotary, lambda table: table.to(device)),
    )


def placement_for(adapter: Adapter) -> Placement | None:
    """The model's placement; None when it sits on one device with every weight in place (hooks or not)."""
    hf = adapter.hf
    hooked = [m for m in hf.modules() if getattr(m, "_hf_hook", None) is not None]
    if not hooked and len({t.device for t in _tensors(hf, recurse=True)}) <= 1:
        return None
    if not adapter.placeable:
        raise CircuitsError(
            f"{type(hf).__name__} sits on several devices (or has accelerate hooks); this architecture runs on one "
            "device: move it with .to(device)"
        )
    parents = {child: parent for parent in hf.modules() for child in parent.children()}
    devices = _Devices(parents)
    home = devices.one(adapter.input_modules(), "the embedding")
    stages: list[Stage | None] = []
    used = {str(home)}
    for layer in range(adapter.n_layers):
        block = adapter.layer_module(layer)
        device = devices.one([block], f"layer {layer}")
        used.add(str(device))
        block_hooks = [(m, m._hf_hook) for m in block.modules() if getattr(m, "_hf_hook", None) is not None]
        loaders = [(a, a._hf_hook) for a in _ancestors(block, parents) if _offloads(getattr(a, "_hf_hook", None))]
        plain = all(_is_plain(hook) for _, hook in block_hooks)
        stages.append(None if device == home and plain and not loaders else Stage(device, block_hooks, loaders))
    output = devices.one([adapter.final_norm()], "the final norm")
    elsewhere = {devices.hooked(m) for m in hooked} - {home, None}  # e.g. the head or the rotary table
    if all(stage is None for stage in stages) and output == home and not elsewhere:
        return None
    return Placement(home, stages, output, sorted(used))


class _Devices:
    """Execution devices of modules: an accelerate hook's on the module or its nearest hooked ancestor, else
    where the module's own weights are."""

    def __init__(self, parents: dict[nn.Module, nn.Module]):
        self.parents = parents
        self.memo: dict[nn.Module, torch.device | None] = {}

    def hooked(self, module: nn.Module) -> torch.device | None:
        if module not in self.memo:
            device = _execution_device(getattr(module, "_hf_hook", None))
            parent = self.parents.get(module)
            self.memo[module] = device if device is not None or parent is None else self.hooked(parent)
        return self.memo[module]

    def one(self, modules: list[nn.Module], what: str) -> torch.device:
        found = set()
        for module in modules:
            for sub in module.modules():
                direct = _tensors(sub, recurse=False)
                if not direct:
                    continue
                device = self.hooked(sub)
                found |= {device} if device is not None else {t.device for t in direct if t.device.type != "meta"}
        if len(found) != 1:
            problem = "is spread over " + ", ".join(sorted(map(str, found))) if found else "has no weights loaded"
            raise CircuitsError(
                f"{what} {problem}; circuits needs each layer (and the embedding, the final norm) on one device: "
                "place whole layers (device_map entries per block, as device_map='auto' does)"
            )
        return found.pop()


def _tensors(module: nn.Module, recurse: bool) -> list[torch.Tensor]:
    return [*module.parameters(recurse=recurse), *module.buffers(recurse=recurse)]


def _ancestors(module: nn.Module, parents: dict[nn.Module, nn.Module]) -> Iterator[nn.Module]:
    while module in parents:
        module = parents[module]
        yield module


def _hooks(hook) -> Iterator[object]:
    """A hook and, for accelerate's ``SequentialHook``, those it chains."""
    if hook is None:
        return
    yield hook
    for inner in getattr(hook, "hooks", ()):
        yield from _hooks(inner)


def _is_align(hook) -> bool:
    return type(hook).__name__ == "AlignDevicesHook"


def _offloads(hook) -> bool:
    return any(_is_align(h) and h.offload for h in _hooks(hook))


def _is_plain(hook) -> bool:
    """Only places inputs on the device the weights are on already: harmless to let fire."""
    return all(_is_align(h) and not h.offload for h in _hooks(hook))


def _execution_device(hook) -> torch.device | None:
    for h in _hooks(hook):
        if _is_align(h) and h.execution_device is not None:
            return _as_device(h.execution_device)
    return None


def _as_device(value) -> torch.device:
    """A hook's execution device (an index, a name or a device) as a torch device with its index."""
    if isinstance(value, int):
        from accelerate.utils.modeling import normalize_device

        value = normalize_device(value)
        value = torch.device("cuda", value) if isinstance(value, int) else value
    device = torch.device(value)
    backend = getattr(torch, device.type, None)
    if device.type != "cpu" and device.index is None and hasattr(backend, "current_device"):
        device = torch.device(device.type, backend.current_device())  # "cuda" is where tensors go: cuda:N
    return device


@functools.cache
def _silent_hook():
    """A hook that does nothing: put in place of a block's hooks while the engine runs the block itself."""
    from accelerate.hooks import ModelHook

    return ModelHook()
