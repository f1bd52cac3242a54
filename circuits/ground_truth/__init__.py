"""Models with known circuits: compiled (tracr) and trained toy models, shipped as package data.

Each model is a directory ``data/<name>/`` holding

- ``config.json``, ``model.safetensors``: a ``circuits.native.NativeTransformer`` (its ``save``);
- ``task.json``: the task as ``circuits.Task.to_dict`` writes it (token ids and answers, or
  outputs scored at several positions), plus ``"description"``, optional ``"vocab"`` (input token
  names, by id) and any other keys (``vocab_out``, ``bos``, ...: kept in ``GroundTruth.info``);
- ``truth.json``: ``{"edges": [edge names, exactly as in model.graph.edges], "how": "the criterion
  that established them", "script": "the command that built the directory"}``.

``available()`` lists the names, ``load(name)`` gives a ``GroundTruth``. Loading needs only torch
and safetensors (no jax, no network).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import CircuitsError
from ..model import Model
from ..native import CONFIG_FILE, WEIGHTS_FILE, NativeTransformer
from ..task import Task

DATA = Path(__file__).resolve().parent / "data"
TASK_FILE = "task.json"
TRUTH_FILE = "truth.json"
FILES = (CONFIG_FILE, WEIGHTS_FILE, TASK_FILE, TRUTH_FILE)


@dataclass
class GroundTruth:
    """A model, the task it was built for, and the edges of its known circuit."""

    name: str
    description: str
    model: Model
    task: Task
    edges: set[str]
    how: str = ""  # how the edge set was established
    script: str = ""  # the command that built the directory
    vocab: list[str] | None = None  # input token names by id, when known
    info: dict[str, Any] = field(default_factory=dict)  # any further keys of task.json

    @property
    def inert_sources(self) -> set[str]:
        """Source nodes whose output is exactly zero by construction (see ``inert_sources``)."""
        return inert_sources(self.model)

    @property
    def scored_edges(self) -> list[str]:
        """The graph's edges minus those into or out of an inert node: every other edge can matter.

        An edge out of an inert source, or into a destination that feeds only inert nodes, scores
        exactly 0 under every method; restricting a ROC AUC to ``scored_edges`` keeps these free
        true negatives from inflating it.
        """
        return live_edges(self.model)


def available() -> list[str]:
    """Names of the ground-truth models shipped in ``circuits/ground_truth/data``."""
    if not DATA.is_dir():
        return []
    return sorted(p.name for p in DATA.iterdir() if p.is_dir() and all((p / f).is_file() for f in FILES))


def directory(name: str) -> Path:
    """The data directory of ground-truth model ``name``; ValueError listing the names if unknown."""
    names = available()
    if not isinstance(name, str) or name not in names:
        raise CircuitsError(f"unknown ground-truth model {name!r}; available: {', '.join(names) or 'none'}")
    return DATA / name


def load(name: str, device: str | torch.device = "cpu") -> GroundTruth:
    """The ground-truth model ``name`` (one of ``available()``) with its task and circuit edges."""
    return load_directory(directory(name), device=device)


def load_directory(path: str | os.PathLike, device: str | torch.device = "cpu") -> GroundTruth:
    """A ground-truth directory anywhere on disk (the layout of the module docstring)."""
    path = Path(path)
    for file in FILES:
        if not (path / file).is_file():
            raise CircuitsError(f"ground-truth directory {path} lacks {file}")
    model = Model.from_hf(NativeTransformer.load(path, device=device), name=path.name)
    task_data = _read_json(path / TASK_FILE)
    truth = _read_json(path / TRUTH_FILE)
    task = task_from_json(task_data, path / TASK_FILE)
    edges = truth.get("edges")
    if not isinstance(edges, list) or not all(isinstance(e, str) for e in edges):
        raise CircuitsError(f"{path / TRUTH_FILE}: 'edges' must be a list of edge names")
    for edge in edges:
        try:
            model.graph.index(edge)
        except ValueError as error:
            raise CircuitsError(f"{path / TRUTH_FILE}: {error}") from None
    known = {"description", "vocab", *task.to_dict()}
    return GroundTruth(
        name=path.name,
        description=str(task_data.get("description", "")),
        model=model,
        task=task,
        edges=set(edges),
        how=str(truth.get("how", "")),
        script=str(truth.get("script", "")),
        vocab=task_data.get("vocab"),
        info={k: v for k, v in task_data.items() if k not in known},
    )


def task_from_json(data: dict[str, Any], where: str | os.PathLike = "task.json") -> Task:
    """The ``circuits.Task`` of a ``task.json`` object (``Task.from_dict``; extra keys are ignored)."""
    try:
        return Task.from_dict(data)
    except ValueError as error:
        raise CircuitsError(f"{where}: {error}") from None


def task_to_json(task: Task, description: str = "", **extra: Any) -> dict[str, Any]:
    """The ``task.json`` object of a token-id ``circuits.Task`` (``extra``: vocab, vocab_out, ...)."""
    if not task.token_ids:
        raise CircuitsError(f"task {task.name!r} holds text; a ground-truth task needs token ids")
    return {**task.to_dict(), "description": description, **extra}


def inert_sources(model: Model) -> set[str]:
    """Sources of a native model whose output is exactly zero by construction.

    An MLP node of an attention-only model (``d_mlp = 0``), an MLP whose ``W_out`` and ``b_out``
    are all zero, and a head whose ``W_O`` is all zero (tracr pads layers with such heads).
    """
    hf = model.hf
    if not isinstance(hf, NativeTransformer):
        return set()
    inert = set()
    for layer, block in enumerate(hf.blocks):
        mlp = block.mlp
        if mlp is None or (not mlp.W_out.any() and not mlp.b_out.any()):
            inert.add(f"m{layer}")
        for head in range(hf.config.n_heads):
            if not block.attn.W_O[head].any():
                inert.add(f"a{layer}.h{head}")
    return inert


def live_edges(model: Model) -> list[str]:
    """Edges whose source is not inert and whose destination feeds some non-inert node (``logits`` always)."""
    graph, inert = model.graph, inert_sources(model)
    live = []
    for edge in graph.edges:
        source, destination = edge.split("->")
        if source in inert:
            continue
        if destination != "logits":
            fed = graph.feeds[graph.destination_index(destination)].nonzero().flatten().tolist()
            if all(graph.sources[s] in inert for s in fed):
                continue
        live.append(edge)
    return live


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CircuitsError(f"cannot read {path}: {error}") from None
    if not isinstance(data, dict):
        raise CircuitsError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


__all__ = [
    "GroundTruth",
    "available",
    "directory",
    "inert_sources",
    "live_edges",
    "load",
    "load_directory",
    "task_from_json",
    "task_to_json",
]
