"""Resumable work: one checkpoint mechanism for every long computation (attribution, exact patching, ACDC).

A checkpoint is one file at a path the user chooses, holding

- a **fingerprint**: everything that determines the computation's result, as named parts
  (``"task content"``, ``"task metric"``, ``"model config"``, ``"model weights"``, ``"method"``,
  ``"threshold"``, ...), each a short value or a SHA-256 digest;
- a small JSON **state** (how far the work got, counters, running values);
- optional named **tensors** (a running score sum, an edge mask), stored as safetensors.

The file is a safetensors file whose metadata carries the fingerprint and the state as JSON, so one
atomic write (``circuits.io``) saves all of it: a reader sees the previous checkpoint or the new one,
never a mix, even when the process is killed mid-write. No pickle.

Using it::

    checkpoint = Checkpoint(path, fingerprint(model, task, {"method": "acdc", "threshold": 0.01}))
    saved = checkpoint.load()         # None when the file does not exist yet
    ...                               # start from saved.state / saved.tensors, or from scratch
    checkpoint.save({"next": 7}, {"scores": running_sum})   # after each unit of work

Loading a checkpoint whose fingerprint differs from the one asked for raises ``CircuitsError``
naming the parts that differ (a mismatch is an error, never a silent reuse); an unreadable file
does too. A finished computation keeps its checkpoint: asking again returns the result at once.
``open_checkpoint(path, model, task, parameters)`` is the one call a method needs (None for no path).

A run of several phases (``circuits discover --checkpoint DIR``) keeps one file per phase in a
folder claimed by ``checkpoint_folder``: the folder's ``run.ckpt`` holds the whole run's
fingerprint, so a different run with the same folder fails before any phase starts.

What a method saves: the gradient methods and ``exact`` the running score sum and the next batch
after each batch (resumed, the same sums happen in the same order: the identical tensor); ACDC the
kept-edge mask, the current metric, the next destination and its cost counters after each
destination (so ``forward_equivalents`` after a resume counts the work before the interruption).
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from . import distributed
from .errors import CircuitsError
from .io import atomic_write_bytes, remove_stale_temporary_files

if TYPE_CHECKING:
    from .model import Model
    from .task import Task

FORMAT = 1  # the checkpoint layout; another value is refused
METADATA_KEY = "circuits.checkpoint"
RUN_FILE = "run.ckpt"  # in a checkpoint folder: the fingerprint of the run the folder belongs to
SHORT = 80  # a part whose JSON is longer than this is stored as its digest
# Config keys that say where a model came from or what wrote it, not what it computes.
PROVENANCE_KEYS = ("_name_or_path", "name_or_path", "transformers_version", "_commit_hash")

Fingerprint = dict[str, str]


@dataclass
class Saved:
    """What a checkpoint file holds."""

    fingerprint: Fingerprint
    state: dict[str, Any]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)


class Checkpoint:
    """The resumable state of one computation at ``path``, valid only for ``fingerprint``.

    ``load()`` returns the saved state (``None`` if there is none yet) after checking the
    fingerprint; ``save(state, tensors)`` replaces the file atomically. ``state`` is JSON data
    (floats round-trip exactly); ``tensors`` are saved bit for bit (on the CPU).
    """

    def __init__(self, path: str | Path, fingerprint: Mapping[str, str], what: str | None = None):
        self.path = checkpoint_path(path)
        self.fingerprint: Fingerprint = dict(fingerprint)
        self.what = what or f"checkpoint {self.path.name}"  # how error messages name it

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}: {', '.join(self.fingerprint)})"

    def load(self) -> Saved | None:
        """The saved state, or None when the file does not exist; a CircuitsError when it belongs to
        another computation (naming the parts that differ) or cannot be read."""
        data = distributed.from_main(lambda: self.path.read_bytes() if self.path.exists() else None, str(self.path))
        if data is None:
            return None
        saved = read_checkpoint(self.path, data)
        names = [*self.fingerprint, *(name for name in saved.fingerprint if name not in self.fingerprint)]
        differing = [name for name in names if saved.fingerprint.get(name) != self.fingerprint.get(name)]
        if differing:
            raise CircuitsError(
                f"{self.what} belongs to another run: {_differences(differing, saved, self)}; "
                "use another path or delete it"
            )
        return saved

    def save(self, state: Mapping[str, Any], tensors: Mapping[str, torch.Tensor] | None = None) -> None:
        """Replace the checkpoint file with ``state`` and ``tensors`` (atomically; under torch.distributed rank 0
        writes it, and every rank reads rank 0's)."""
        if not distributed.is_main():
            return
        header = {"format": FORMAT, "fingerprint": self.fingerprint, "state": dict(state)}
        plain = {name: tensor.detach().to("cpu").contiguous() for name, tensor in (tensors or {}).items()}
        from safetensors.torch import save

        atomic_write_bytes(self.path, save(plain, metadata={METADATA_KEY: json.dumps(header)}))


def checkpoint_path(path: Any) -> Path:
    """``path`` as a Path, or a CircuitsError when it is not a file path."""
    if not isinstance(path, (str, Path)) or not str(path):
        raise CircuitsError(f"checkpoint must be a file path, got {path!r}")
    path = Path(path)
    if path.is_dir():
        raise CircuitsError(f"checkpoint {path} is a folder; give the path of a file")
    return path


def open_checkpoint(
    path: str | Path | None, model: Model, task: Task, parameters: Mapping[str, Any]
) -> Checkpoint | None:
    """A ``Checkpoint`` at ``path`` for this model, task and parameters, or None when ``path`` is None."""
    if path is None:
        return None
    checked = checkpoint_path(path)  # before the (possibly slow) fingerprint
    return Checkpoint(checked, fingerprint(model, task, parameters))


def checkpoint_folder(folder: str | Path | None, model: Model, task: Task, settings: Mapping[str, Any]) -> Path | None:
    """A folder for the checkpoints of a run's phases (one file each), claimed for this run: its fingerprint
    (model, task and ``settings``) is saved in ``folder/run.ckpt`` on first use and checked on every later
    one, so a different run with the same folder fails at once (CircuitsError naming what differs), before
    any phase. None when ``folder`` is None."""
    if folder is None:
        return None
    if not isinstance(folder, (str, Path)) or not str(folder):
        raise CircuitsError(f"checkpoint folder must be a path, got {folder!r}")
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise CircuitsError(f"checkpoint folder {folder} exists and is not a folder")
    remove_stale_temporary_files(folder)  # of a run killed while it saved a checkpoint
    run = Checkpoint(folder / RUN_FILE, fingerprint(model, task, settings), what=f"checkpoint folder {folder}")
    if run.load() is None:
        run.save({})
    return folder


def read_checkpoint(path: str | Path, data: bytes | None = None) -> Saved:
    """A checkpoint file's contents (or those of its bytes ``data``), fingerprint unchecked (to inspect one);
    CircuitsError if unreadable."""
    path = Path(path)
    try:
        data = path.read_bytes() if data is None else data
        (length,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + length])
        meta = json.loads(header["__metadata__"][METADATA_KEY])
        if meta.get("format") != FORMAT:
            raise ValueError(f"format {meta.get('format')!r}, this version of circuits reads format {FORMAT}")
        from safetensors.torch import load

        tensors = load(data)
        fingerprint, state = meta["fingerprint"], meta["state"]
        if not isinstance(fingerprint, dict) or not isinstance(state, dict):
            raise ValueError("no fingerprint or state")
    except Exception as error:  # any malformed byte: struct, JSON, safetensors and key errors alike
        reason = f"{type(error).__name__}: {error}".splitlines()[0][:200]
        raise CircuitsError(f"checkpoint {path} is unreadable ({reason}); delete it to start over") from None
    return Saved({str(k): str(v) for k, v in fingerprint.items()}, state, tensors)


# --- fingerprints ---------------------------------------------------------------------------


def fingerprint(model: Model | None, task: Task | None, parameters: Mapping[str, Any] = ()) -> Fingerprint:
    """The named parts that determine a computation's result: the task's content and metric, the model's
    config and weights, and each of ``parameters`` (JSON data or tensors, e.g. an edge mask).

    A part is stored as its JSON text when short, else as its SHA-256 digest. The model's device is
    not part of it: a run may resume on another device (its numbers then agree to float precision).
    """
    parts: Fingerprint = {}
    if task is not None:
        parts.update(task_fingerprint(task, None if model is None else model.tokenizer))
    if model is not None:
        parts.update(model_fingerprint(model))
    for name, value in dict(parameters).items():
        parts[name] = describe(value)
    return parts


def describe(value: Any) -> str:
    """A fingerprint part: ``value``'s JSON text if short, else ``sha256:`` and its digest (tensors: of
    their dtype, shape and bytes)."""
    if isinstance(value, torch.Tensor):
        digest = hashlib.sha256()
        _hash_tensor(digest, "", value)
        return f"sha256:{digest.hexdigest()}"
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= SHORT else f"sha256:{hashlib.sha256(text.encode()).hexdigest()}"


def task_fingerprint(task: Task, tokenizer=None) -> Fingerprint:
    """``task content``: the digest of the tokenized task (clean and corrupted ids, attention mask,
    prediction positions, answer and wrong-answer ids, scored outputs), so text and token-id tasks are
    covered alike, and so is what the tokenizer makes of the text; the task's name is not part of it.
    ``task metric``: the metric's name and ``higher_is_better``. A callable metric cannot be
    fingerprinted by its content: its module and qualified name stand for it, so editing the body of a
    metric function without renaming it is not detected."""
    tokenized = task.tokenize(tokenizer)
    digest = hashlib.sha256()
    for name, value in sorted(vars(tokenized).items()):
        if isinstance(value, torch.Tensor):
            _hash_tensor(digest, name, value)
        elif value is not None:
            digest.update(f"{name}={value!r};".encode())
    metric = task.metric
    if callable(metric):
        metric = f"callable {getattr(metric, '__module__', '?')}.{getattr(metric, '__qualname__', repr(metric))}"
    return {
        "task content": f"sha256:{digest.hexdigest()}",
        "task metric": describe({"metric": metric, "higher_is_better": task.higher_is_better}),
    }


def model_fingerprint(model: Model) -> Fingerprint:
    """``model config``: the digest of the model's config as JSON (where it came from left out) and its dtype.
    ``model weights``: the SHA-256 of every tensor of its state dict (name, dtype, shape, bytes) in name
    order, shared tensors once. Computed once per model and cached on it (about 0.5 s per 500 MB of
    weights on one CPU core); an in-place change of a weight is noticed (torch's version counters) and
    recomputes it."""
    config = model.hf.config.to_dict()
    for key in PROVENANCE_KEYS:
        config.pop(key, None)
    config_text = json.dumps({"config": config, "dtype": str(model.dtype)}, sort_keys=True, default=str)
    return {
        "model config": f"sha256:{hashlib.sha256(config_text.encode()).hexdigest()}",
        "model weights": weights_digest(model),
    }


def weights_digest(model: Model) -> str:
    """The SHA-256 of the model's weights, cached on the model until a weight changes."""
    tensors = sorted(model.hf.state_dict().items())
    key = tuple((name, t.data_ptr(), t._version, t.dtype, tuple(t.shape)) for name, t in tensors)
    cached = getattr(model, "_circuits_weights_digest", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    digest = hashlib.sha256()
    seen = set()
    for name, tensor in tensors:
        identity = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tensor.stride())
        if tensor.device.type != "meta" and identity in seen:
            digest.update(f"{name} shared;".encode())
            continue
        seen.add(identity)
        _hash_tensor(digest, name, tensor)
    value = f"sha256:{digest.hexdigest()}"
    model._circuits_weights_digest = (key, value)
    return value


def _hash_tensor(digest, name: str, tensor: torch.Tensor) -> None:
    digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
    if tensor.device.type == "meta":  # offloaded without data here: only its name, dtype and shape
        return
    flat = tensor.detach().reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    digest.update(flat.to("cpu").contiguous().view(torch.uint8).numpy())


def _differences(names: list[str], saved: Saved, wanted: Checkpoint) -> str:
    """``threshold (0.5 in the checkpoint, 0.1 now) and task content differ``: values shown when short."""
    described = []
    for name in names:
        old, new = saved.fingerprint.get(name), wanted.fingerprint.get(name)
        if old is None or new is None or old.startswith("sha256:") or new.startswith("sha256:"):
            described.append(name)
        else:
            described.append(f"{name} ({old} in the checkpoint, {new} now)")
    text = described[0] if len(described) == 1 else ", ".join(described[:-1]) + " and " + described[-1]
    return f"{text} {'differs' if len(described) == 1 else 'differ'}"
