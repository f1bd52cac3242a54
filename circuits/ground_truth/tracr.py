"""Models compiled with tracr (Lindner et al. 2023) as native transformers, with their tasks and known circuits.

``from_tracr(assembled_model, inputs)`` reads what tracr's ``AssembledTransformerModel`` holds: its
parameters (numpy-convertible arrays), its residual-space labels, its config and its input/output
encoders. It needs no jax itself (whoever holds an assembled model has jax; the tests use a
stand-in object made of numpy arrays).

The conversion: tracr stacks an attention sublayer and an MLP sublayer per layer, which is one
native block; there are no norms, attention is bidirectional unless the program was compiled
causal, and the attention logits are divided by sqrt(key_size) as tracr's attention does
(``attn_scale=None`` means exactly that). Heads and MLPs that tracr leaves empty are zero. The
unembedding projects the residual stream onto the program's output space: one logit per output
value of a categorical program, one value (logit 0) for a numerical one.

The known circuit is read off the weights. Every residual direction belongs to one named space
(``tokens:x``, ``indices:3``, ``one``, an SOp's values), and every node writes and reads whole
basis directions. An edge ``u->v`` is a *weight edge* when a direction ``u`` writes (a non-zero
column of its output map: the embeddings for ``input``, a head's ``W_O``, an MLP's ``W_out``) is
one ``v`` reads (a non-zero row of its input map: ``W_Q``, ``W_K``, ``W_V`` of a head, ``W_in`` of
an MLP, ``W_U`` for the logits). A few weight edges carry nothing on any input: a selector whose
predicate is TRUE gives the same attention score to every key, whatever its query and key hold,
and the query's ``one`` direction only makes a head fall back to BOS when no key matches, which
never happens in some programs. Ablating such an edge changes no output, so no method can find
it; ``from_tracr`` drops a weight edge when ablating it alone (zero and patching ablation, one
edge at a time) moves no scored output by more than ``inert_tolerance``, and returns the rest.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..engine import patched_forward, patching_values
from ..errors import CircuitsError
from ..graph import Graph
from ..model import Model
from ..native import NativeConfig, NativeTransformer
from ..task import Task

BOS = "BOS"


@dataclass
class TracrInfo:
    """What the conversion learned about the compiled program, for task files and checks."""

    input_vocab: list[str]  # token names by input id
    output_vocab: list[str]  # output names by logit index (["value"] for a numerical program)
    numeric: bool  # the program's output is a number (logit 0), not a category
    bos_id: int
    output_labels: list[str]  # the residual directions the logits read
    residual_labels: list[str] = field(default_factory=list)
    max_seq_len: int = 0  # prompt length the model takes, BOS included

    def encode(self, sequence: Sequence[Any]) -> list[int]:
        """Token ids of an input sequence (BOS prepended when missing); ValueError naming an unknown token."""
        names = {name: i for i, name in enumerate(self.input_vocab)}
        tokens = [str(t) for t in sequence]
        if not tokens or tokens[0] != self.input_vocab[self.bos_id]:
            tokens = [self.input_vocab[self.bos_id], *tokens]
        for token in tokens:
            if token not in names:
                raise CircuitsError(
                    f"token {token!r} is not in the compiled vocabulary ({', '.join(self.input_vocab)})"
                )
        if len(tokens) > self.max_seq_len:
            raise CircuitsError(
                f"sequence {list(sequence)!r} has {len(tokens)} tokens with BOS; the model takes {self.max_seq_len}"
            )
        return [names[t] for t in tokens]


def native_from_tracr(assembled_model: Any, output_space: str | None = None) -> tuple[NativeTransformer, TracrInfo]:
    """The compiled model as a ``NativeTransformer`` (float32, eval mode) and what is known about its program.

    ``output_space``: the name of the program's output SOp (e.g. ``"reverse_1"``); by default the
    residual space that some layer writes and no layer reads.
    """
    params = {
        key: {name: np.asarray(value, dtype=np.float64) for name, value in group.items()}
        for key, group in _params(assembled_model).items()
    }
    labels = [str(label) for label in getattr(assembled_model, "residual_labels", None) or []]
    config = assembled_model.model_config
    n_layers, n_heads, d_head = int(config.num_layers), int(config.num_heads), int(config.key_size)
    if getattr(config, "layer_norm", False):
        raise CircuitsError("the compiled model uses layer norm; compile with layer_norm=False (tracr's default)")
    activation = getattr(config, "activation_function", None)
    if activation is not None and "relu" not in str(getattr(activation, "__name__", activation)).lower():
        raise CircuitsError(f"the compiled model's MLP activation is {activation!r}; only ReLU is supported")
    token_embed = params["token_embed"]["embeddings"]
    pos_embed = params["pos_embed"]["embeddings"]
    d_model = token_embed.shape[1]
    if len(labels) != d_model:
        raise CircuitsError(f"the model has {len(labels)} residual labels but a {d_model}-dimensional residual stream")

    input_vocab, bos_id = _input_vocab(assembled_model.input_encoder, token_embed.shape[0])
    output_map = getattr(assembled_model.output_encoder, "encoding_map", None)
    numeric = output_map is None
    output_labels = _output_labels(params, labels, n_layers, output_map, output_space)
    output_vocab = ["value"] if numeric else [str(v) for v, _ in sorted(output_map.items(), key=lambda kv: kv[1])]
    d_mlp = max(int(getattr(config, "mlp_hidden_size", 0) or 0), 1)

    native_config = NativeConfig(
        vocab_size=token_embed.shape[0],
        n_layers=n_layers,
        d_model=d_model,
        n_heads=n_heads,
        d_head=d_head,
        d_mlp=d_mlp,
        n_positions=pos_embed.shape[0],
        layer_norm=False,
        causal=bool(getattr(config, "causal", False)),
        attn_scale=None,  # d_head ** -0.5, as tracr's attention divides by sqrt(key_size)
        d_vocab_out=len(output_labels),
    )
    model = NativeTransformer(native_config)
    state = {"embed.weight": token_embed, "pos_embed.weight": pos_embed}
    for layer in range(n_layers):
        prefix = f"transformer/layer_{layer}"
        for letter, key in (("Q", "query"), ("K", "key"), ("V", "value")):
            weight, bias = _linear(params, f"{prefix}/attn/{key}", d_model, n_heads * d_head)
            state[f"blocks.{layer}.attn.W_{letter}"] = weight.reshape(d_model, n_heads, d_head).transpose(1, 0, 2)
            state[f"blocks.{layer}.attn.b_{letter}"] = bias.reshape(n_heads, d_head)
        weight, bias = _linear(params, f"{prefix}/attn/linear", n_heads * d_head, d_model)
        state[f"blocks.{layer}.attn.W_O"] = weight.reshape(n_heads, d_head, d_model)
        state[f"blocks.{layer}.attn.b_O"] = bias
        w_in, b_in = _linear(params, f"{prefix}/mlp/linear_1", d_model, None)
        w_out, b_out = _linear(params, f"{prefix}/mlp/linear_2", w_in.shape[1], d_model)
        hidden = w_in.shape[1]
        state[f"blocks.{layer}.mlp.W_in"] = _pad(w_in, (d_model, d_mlp))
        state[f"blocks.{layer}.mlp.b_in"] = _pad(b_in, (d_mlp,))
        state[f"blocks.{layer}.mlp.W_out"] = _pad(w_out, (d_mlp, d_model)) if hidden else np.zeros((d_mlp, d_model))
        state[f"blocks.{layer}.mlp.b_out"] = b_out
    unembed = np.zeros((d_model, len(output_labels)))
    for column, label in enumerate(output_labels):
        unembed[labels.index(label), column] = 1.0
    state["W_U"], state["b_U"] = unembed, np.zeros(len(output_labels))
    expected = model.state_dict()
    with torch.no_grad():
        for name, value in state.items():
            if tuple(value.shape) != tuple(expected[name].shape):
                raise CircuitsError(
                    f"tracr parameter for {name} has shape {value.shape}, expected {tuple(expected[name].shape)}"
                )
            expected[name].copy_(torch.from_numpy(np.ascontiguousarray(value)))
    info = TracrInfo(input_vocab, output_vocab, numeric, bos_id, output_labels, labels, pos_embed.shape[0])
    return model.eval(), info


def weight_edges(native: NativeTransformer, graph: Graph) -> set[str]:
    """Edges ``u->v`` where a residual direction ``u`` writes is one ``v`` reads (exactly non-zero weights)."""
    writes, reads = node_spaces(native)
    edges = set()
    for name in graph.edges:
        source, destination = name.split("->")
        if writes[source] & reads[destination]:
            edges.add(name)
    return edges


def node_spaces(native: NativeTransformer) -> tuple[dict[str, set[int]], dict[str, set[int]]]:
    """Per source node the residual directions it writes; per destination the directions it reads."""

    def rows(matrix: torch.Tensor) -> set[int]:
        return set(matrix.detach().abs().sum(1).nonzero().flatten().tolist())

    cfg = native.config
    embeddings = [native.embed.weight] + ([native.pos_embed.weight] if native.pos_embed is not None else [])
    writes = {"input": set().union(*(rows(e.T) for e in embeddings))}
    reads = {"logits": rows(native.W_U)}
    for layer, block in enumerate(native.blocks):
        attn = block.attn
        for head in range(cfg.n_heads):
            writes[f"a{layer}.h{head}"] = rows(attn.W_O[head].T)
            for letter, weight in (("q", attn.W_Q), ("k", attn.W_K), ("v", attn.W_V)):
                reads[f"a{layer}.h{head}<{letter}>"] = rows(weight[head])
        if block.mlp is None:
            writes[f"m{layer}"], reads[f"m{layer}"] = set(), set()
        else:
            out = rows(block.mlp.W_out.T) | set(block.mlp.b_out.detach().nonzero().flatten().tolist())
            writes[f"m{layer}"], reads[f"m{layer}"] = out, rows(block.mlp.W_in)
    return writes, reads


def edge_effects(model: Model, task: Task, edges: Sequence[str]) -> dict[str, float]:
    """Per edge: the largest change of any scored output when that edge alone is ablated (zero or patching)."""
    tokens = task.tokenize().to(model.device)
    mask = (tokens.output_mask if tokens.output_mask is not None else torch.ones_like(tokens.attention_mask)).bool()
    graph = model.graph
    effects = {}
    with torch.no_grad():
        clean = patched_forward(model, tokens.clean_ids, tokens.attention_mask).logits
        patches = {"zero": None, "patching": patching_values(model, tokens.attention_mask, tokens.corrupted_ids)}
        for edge in edges:
            i, j = graph.index(edge)
            edge_mask = torch.ones(graph.n_src, graph.n_dst, dtype=model.dtype, device=model.device)
            edge_mask[i, j] = 0.0
            largest = 0.0
            for patch in patches.values():
                logits = patched_forward(model, tokens.clean_ids, tokens.attention_mask, edge_mask, patch).logits
                largest = max(largest, float((logits - clean).abs()[mask].max()))
            effects[edge] = largest
    return effects


def from_tracr(
    assembled_model: Any,
    inputs: Sequence[Sequence[Any]],
    corrupted: Sequence[Sequence[Any]] | None = None,
    outputs: Sequence[Sequence[Any]] | None = None,
    name: str = "tracr",
    metric: str = "l2",
    output_space: str | None = None,
    inert_tolerance: float | None = 1e-3,
    tolerance: float = 1e-3,
    seed: int = 0,
) -> tuple[Model, Task, set[str]]:
    """A tracr-compiled model as ``(circuits.Model, circuits.Task, true edge names)``.

    ``inputs``: sequences of the program's input tokens (BOS first, or it is prepended). The task
    scores every output position (all but BOS) against the program's own outputs: ``outputs``
    (decoded values, one per non-BOS position) or, by default, ``assembled_model.apply(sequence)``.
    ``corrupted``: the patching inputs, paired with ``inputs`` (default: the inputs themselves
    shuffled so that no example keeps its own, among sequences of equal length; seeded).
    ``metric``: ``"l2"`` (the ACDC paper's, over every output position), ``"kl"`` or a callable.
    The edges are the weight edges (module docstring) minus those whose single-edge ablation moves
    no scored output by more than ``inert_tolerance`` (None keeps every weight edge).
    """
    native, info = native_from_tracr(assembled_model, output_space)
    model = Model.from_hf(native, name=name)
    if isinstance(inputs, (str, bytes)) or not isinstance(inputs, Sequence) or not inputs:
        raise CircuitsError("inputs must be a non-empty list of input sequences")
    clean_ids = [info.encode(sequence) for sequence in inputs]
    if corrupted is None:
        corrupted_ids = _derangement(clean_ids, seed)
    else:
        if len(corrupted) != len(inputs):
            raise CircuitsError(f"corrupted has {len(corrupted)} sequences but inputs has {len(inputs)}")
        corrupted_ids = [info.encode(sequence) for sequence in corrupted]
    if outputs is None:
        outputs = [list(assembled_model.apply(_with_bos(sequence, info)).decoded)[1:] for sequence in inputs]
    targets = [
        _targets(row, info, len(ids) - 1, f"example {i}")
        for i, (row, ids) in enumerate(zip(outputs, clean_ids, strict=True))
    ]
    positions = [list(range(1, len(ids))) for ids in clean_ids]
    task = Task.from_outputs(
        name, clean_ids, corrupted_ids, targets, positions, metric=metric, numeric=info.numeric, tolerance=tolerance
    )
    edges = weight_edges(native, model.graph)
    if inert_tolerance is not None:
        effects = edge_effects(model, task, sorted(edges))
        edges = {edge for edge, effect in effects.items() if effect > inert_tolerance}
    return model, task, edges


# --- helpers ---------------------------------------------------------------------------------


def _params(assembled_model: Any) -> dict[str, dict[str, Any]]:
    params = getattr(assembled_model, "params", None)
    if not isinstance(params, dict) or "token_embed" not in params or "pos_embed" not in params:
        raise CircuitsError("not a tracr assembled model: its params lack token_embed/pos_embed")
    return params


def _linear(params: dict, key: str, rows: int, columns: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Weight and bias of one tracr linear layer (zeros when tracr has none)."""
    if key not in params:
        if columns is None:
            return np.zeros((rows, 0)), np.zeros(0)
        return np.zeros((rows, columns)), np.zeros(columns)
    group = params[key]
    weight = group["w"]
    bias = group.get("b", np.zeros(weight.shape[1]))
    return weight, bias


def _pad(array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    padded = np.zeros(shape)
    padded[tuple(slice(0, n) for n in array.shape)] = array
    return padded


def _input_vocab(encoder: Any, size: int) -> tuple[list[str], int]:
    mapping = getattr(encoder, "encoding_map", None)
    if not isinstance(mapping, dict) or sorted(mapping.values()) != list(range(size)):
        raise CircuitsError(f"the input encoder must map {size} tokens to ids 0..{size - 1}")
    vocab = [""] * size
    for token, index in mapping.items():
        vocab[index] = str(token)
    bos = getattr(encoder, "bos_token", None) or getattr(encoder, "_bos_token", None) or BOS
    if str(bos) not in vocab:
        raise CircuitsError(f"the input vocabulary has no BOS token {bos!r}")
    return vocab, vocab.index(str(bos))


def _output_labels(
    params: dict, labels: list[str], n_layers: int, output_map: dict | None, name: str | None
) -> list[str]:
    """The residual directions of the output space, in logit order."""
    if name is None:
        name = _find_output_space(params, labels, n_layers, output_map)
    if output_map is None:
        if name not in labels:
            raise CircuitsError(f"no residual direction named {name!r} for the numerical output")
        return [name]
    wanted = [f"{name}:{value}" for value, _ in sorted(output_map.items(), key=lambda kv: kv[1])]
    missing = [label for label in wanted if label not in labels]
    if missing:
        raise CircuitsError(f"the output space {name!r} lacks residual direction {missing[0]!r}")
    return wanted


def _find_output_space(params: dict, labels: list[str], n_layers: int, output_map: dict | None) -> str:
    """The space some layer writes and no layer reads, matching the output encoder."""
    written, read = np.zeros(len(labels), bool), np.zeros(len(labels), bool)
    for layer in range(n_layers):
        prefix = f"transformer/layer_{layer}"
        for key in ("query", "key", "value"):
            if f"{prefix}/attn/{key}" in params:
                read |= np.abs(params[f"{prefix}/attn/{key}"]["w"]).sum(1) > 0
        if f"{prefix}/attn/linear" in params:
            written |= np.abs(params[f"{prefix}/attn/linear"]["w"]).sum(0) > 0
        if f"{prefix}/mlp/linear_1" in params:
            read |= np.abs(params[f"{prefix}/mlp/linear_1"]["w"]).sum(1) > 0
            written |= np.abs(params[f"{prefix}/mlp/linear_2"]["w"]).sum(0) > 0
    spaces = sorted({labels[i].split(":")[0] for i in np.nonzero(written & ~read)[0]})
    if output_map is not None:
        values = {str(v) for v in output_map}
        spaces = [
            s for s in spaces if {label.split(":", 1)[1] for label in labels if label.startswith(f"{s}:")} == values
        ]
    else:
        spaces = [s for s in spaces if s in labels]
    if len(spaces) != 1:
        found = ", ".join(spaces) or "none"
        raise CircuitsError(f"cannot tell the output space from the weights (candidates: {found}); pass output_space=")
    return spaces[0]


def _with_bos(sequence: Sequence[Any], info: TracrInfo) -> list[Any]:
    items = list(sequence)
    bos = info.input_vocab[info.bos_id]
    return items if items and str(items[0]) == bos else [bos, *items]


def _targets(row: Sequence[Any], info: TracrInfo, count: int, what: str) -> list[int | float]:
    if isinstance(row, (str, bytes)) or not isinstance(row, Sequence) or len(row) != count:
        raise CircuitsError(f"{what}: expected {count} program outputs (one per non-BOS position), got {row!r}")
    if info.numeric:
        values = []
        for value in row:  # RASP's numerical mean of one boolean is that boolean: it counts as 0 or 1
            try:
                number = float(value)
            except (TypeError, ValueError):
                number = math.nan
            if isinstance(value, str) or not math.isfinite(number):
                raise CircuitsError(f"{what}: program output {value!r} is not a number")
            values.append(number)
        return values
    names = {name: i for i, name in enumerate(info.output_vocab)}
    ids = []
    for value in row:
        if str(value) not in names:
            raise CircuitsError(f"{what}: program output {value!r} is not one of {', '.join(info.output_vocab)}")
        ids.append(names[str(value)])
    return ids


def _derangement(rows: list[list[int]], seed: int) -> list[list[int]]:
    """Each row paired with another row of the same length (a seeded shuffle without fixed points)."""
    by_length: dict[int, list[int]] = {}
    for i, row in enumerate(rows):
        by_length.setdefault(len(row), []).append(i)
    generator = random.Random(seed)
    partner = {}
    for length, members in by_length.items():
        if len(members) < 2:
            raise CircuitsError(f"only one input of length {length}: pass corrupted= to pair it")
        order = members[:]
        while True:
            generator.shuffle(order)
            if all(a != b for a, b in zip(members, order, strict=True)):
                break
        partner.update(zip(members, order, strict=True))
    return [rows[partner[i]] for i in range(len(rows))]


__all__ = ["TracrInfo", "edge_effects", "from_tracr", "native_from_tracr", "node_spaces", "weight_edges"]
