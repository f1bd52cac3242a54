"""How faithful a circuit is, faithfulness curves with MIB's CPR/CMD, and comparisons between edge sets.

Faithfulness f(C) = (m(C) - m(empty)) / (m(full) - m(empty)), where m is the task-mean metric,
``full`` the unmodified model, ``empty`` every edge ablated and m(C) the model with only the
circuit's edges (everything else ablated). Curves use MIB's grid of circuit sizes; CPR is the
area under f for circuits of the highest *signed* scores, CMD the area under |1 - f| for
circuits of the highest *absolute* scores, x as a fraction of all edges, trapezoid rule.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from .batching import BatchPlan, BatchSize, check_batch_size
from .choices import ABLATIONS, Ablation, check_choice
from .circuit import Circuit, Scores, edge_mask_from
from .engine import patched_forward
from .errors import CircuitsError
from .methods.common import EDGES, Resolution, batch_results, spans_on
from .model import Model
from .task import Task, correct, metric_values

if TYPE_CHECKING:
    import pandas as pd

MIB_FRACTIONS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


@dataclass
class Evaluation:
    """The metric with the circuit, the full model and the empty circuit; faithfulness between them."""

    faithfulness: float
    circuit: float
    full: float
    empty: float
    accuracy: float  # with the circuit: an answer beats every wrong answer
    per_example: pd.DataFrame  # columns full, circuit, empty, correct
    edges: int


def masked_metrics(
    model: Model,
    task: Task,
    masks: Sequence[torch.Tensor],
    ablation: Ablation = "patching",
    batch_size: BatchSize | BatchPlan = 32,
    max_memory: int | str | None = None,
    resolution: Resolution = EDGES,
) -> tuple[pd.DataFrame, list[np.ndarray], list[np.ndarray]]:
    """Per-example metric of the full model, the empty circuit and each edge mask (one forward per mask and batch).

    Returns (frame with columns full and empty, per-mask metric arrays, per-mask correctness arrays).
    ``resolution`` says what the masks mask: edges (by span: ``[n_src, n_dst, S]``), the sources' output
    dimensions (``neuron``) or the MLPs' hidden units (``mlp-neuron``); the empty circuit ablates every unit of it.
    ``batch_size``: examples per batch, ``"auto"`` (as many as fit ``max_memory``, see ``circuits.batching``)
    or a ``BatchPlan`` to reuse; a batch that runs out of memory is retried with half as many examples.
    Metrics are computed in float32 whatever the model's dtype.
    """
    import pandas as pd

    check_choice("ablation", ablation, ABLATIONS)
    check_batch_size(batch_size)
    plan = BatchPlan.of(batch_size, model.device, max_memory)
    empty_mask = torch.zeros(resolution.shape(model), dtype=model.dtype, device=model.device)
    float_masks = [m.to(dtype=model.dtype, device=model.device) for m in masks]
    rows: list[torch.Tensor] = []  # per batch: [full, empty, each mask's metric, each mask's correctness] x examples

    def run(batch) -> torch.Tensor:
        tokens = batch.tokens
        clean = _masked_logits(model, batch, None)
        empty = metric_values(task.metric, _masked_logits(model, batch, empty_mask, resolution), tokens, clean)
        values, right = [], []
        for mask in float_masks:
            logits = _masked_logits(model, batch, mask, resolution)
            values.append(metric_values(task.metric, logits, tokens, clean).float())
            right.append(correct(logits, tokens).float())
        return torch.stack([metric_values(task.metric, clean, tokens, clean).float(), empty.float(), *values, *right])

    def store(item: tuple[int, torch.Tensor]) -> None:
        rows.append(item[1].float().cpu())

    with torch.no_grad():
        hidden = resolution.level == "mlp-neuron"
        plan.each(lambda start: batch_results(model, task, ablation, plan, run, start=start, hidden=hidden), store)
    table = torch.cat(rows, 1).numpy()  # [2 + 2 x masks, examples]
    frame = pd.DataFrame({"full": table[0], "empty": table[1]})
    n = len(masks)
    return frame, [table[2 + k] for k in range(n)], [table[2 + n + k].astype(bool) for k in range(n)]


def _masked_logits(model: Model, batch, mask: torch.Tensor | None, resolution: Resolution = EDGES) -> torch.Tensor:
    """The logits with ``mask`` (None: the full model) applied at ``resolution``."""
    tokens = batch.tokens
    masks = {}
    if mask is not None and resolution.level == "neuron":
        masks = {"neuron_mask": mask}
    elif mask is not None and resolution.level == "mlp-neuron":
        masks = {"hidden_mask": mask, "hidden_patch": batch.hidden_patch}
    elif mask is not None:
        masks = {"edge_mask": mask, "spans": resolution.batch_spans(tokens)}
    return patched_forward(
        model, tokens.clean_ids, tokens.attention_mask, patch=batch.patch, logit_positions=tokens.positions, **masks
    ).logits


EQUAL_TOLERANCE = 1e-5  # relative (at least absolute): float32 rounding of the patched forward is ~1e-7


def metrics_equal(full: float, empty: float) -> bool:
    """Whether the full model's and the empty circuit's task-mean metric are equal up to rounding
    (``EQUAL_TOLERANCE`` relative to the larger, and at least absolute): faithfulness is then undefined."""
    return abs(full - empty) <= EQUAL_TOLERANCE * max(1.0, abs(full), abs(empty))


def faithfulness(circuit_value: float, full: float, empty: float) -> float:
    """(m(C) - m(empty)) / (m(full) - m(empty)); NaN (undefined, 0/0) when ``metrics_equal(full, empty)``."""
    return float("nan") if metrics_equal(full, empty) else (circuit_value - empty) / (full - empty)


def check_task(
    model: Model,
    task: Task,
    ablation: Ablation = "patching",
    batch_size: BatchSize | BatchPlan = 32,
    max_memory: int | str | None = None,
) -> tuple[float, float]:
    """The task-mean metric of the full model and of the empty circuit (every edge ablated), or a CircuitsError
    when they are equal: the ablation does not change the metric, so no edge can be credited with anything and
    every faithfulness is 0/0 (``evaluate`` and ``faithfulness_curve`` give NaN). Typical causes: corrupted
    prompts equal to the clean ones, or answers equal to the wrong answers. ``discover`` runs this first.

    With ``patching``, corrupted prompts identical to the clean ones are caught as such (in bfloat16 or float16
    the two metrics can differ by rounding more than ``EQUAL_TOLERANCE``).
    """
    check_choice("ablation", ablation, ABLATIONS)
    tokens = task.tokenize(model.tokenizer)
    if ablation == "patching" and torch.equal(tokens.clean_ids, tokens.corrupted_ids):
        raise CircuitsError(
            f"task {task.name!r}: every corrupted prompt equals its clean prompt, so the corrupted prompts do not "
            "change the metric and nothing can be attributed (faithfulness would be 0/0)"
        )
    frame, _, _ = masked_metrics(model, task, [], ablation, batch_size, max_memory)
    full, empty = float(frame["full"].mean()), float(frame["empty"].mean())
    if metrics_equal(full, empty):
        cause = "the corrupted prompts do" if ablation == "patching" else f"{ablation} ablation of every edge does"
        raise CircuitsError(
            f"task {task.name!r}: the full model and the empty circuit give the same metric ({full:.6g} and "
            f"{empty:.6g}): {cause} not change the metric, so nothing can be attributed (faithfulness would be "
            "0/0); are the answers the same as the wrong answers?"
        )
    return full, empty


def evaluate(
    model: Model,
    task: Task,
    circuit: Circuit,
    ablation: Ablation = "patching",
    batch_size: BatchSize = 32,
    max_memory: int | str | None = None,
) -> Evaluation:
    """Faithfulness of ``circuit`` on ``task``: its edges kept, every other edge ablated (by span: each edge at the
    spans it is kept at; neuron circuits: its units kept, every other unit of their level ablated).

    Faithfulness is NaN when the full model's and the empty circuit's metric are equal (see ``check_task``).
    ``batch_size`` and ``max_memory`` as for ``masked_metrics`` (``"auto"`` fits the batches to memory).
    """
    if circuit.graph.n_src != model.graph.n_src or circuit.graph.n_dst != model.graph.n_dst:
        raise CircuitsError(f"the circuit is for {circuit.graph!r}, but the model has {model.graph!r}")
    resolution = resolution_for(model, task, circuit)
    frame, values, right = masked_metrics(model, task, [circuit.mask], ablation, batch_size, max_memory, resolution)
    frame.insert(1, "circuit", values[0])
    frame["correct"] = right[0]
    full, empty, value = (float(frame[column].mean()) for column in ("full", "empty", "circuit"))
    return Evaluation(
        faithfulness(value, full, empty), value, full, empty, float(frame.correct.mean()), frame, len(circuit)
    )


@dataclass
class Curve:
    """Faithfulness against circuit size; ``frame`` has fraction, edges, faithfulness (signed
    selection) and faithfulness_absolute (absolute selection)."""

    frame: pd.DataFrame
    cpr: float
    cmd: float
    label: str = ""
    meta: dict = field(default_factory=dict)

    def plot(self, ax=None, path=None, others: Sequence[Curve] = ()):
        """Draw this curve (and ``others``) on one axes; see ``circuits.plot.plot_curves``."""
        from .plot import plot_curves

        return plot_curves([self, *others], ax=ax, path=path)


def area(fractions: Sequence[float], values: Sequence[float]) -> float:
    """Trapezoid area with x as given (fractions of all edges, linear scale)."""
    x, y = np.asarray(fractions, dtype=float), np.asarray(values, dtype=float)
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2))


def faithfulness_curve(
    model: Model,
    task: Task,
    scores: Scores,
    fractions: Sequence[float] = MIB_FRACTIONS,
    ablation: Ablation = "patching",
    batch_size: BatchSize = 32,
    label: str | None = None,
    max_memory: int | str | None = None,
) -> Curve:
    """Faithfulness of the top-scoring circuits at each size (pruned), with CPR and CMD as MIB defines them.

    Every faithfulness, CPR and CMD is NaN when the full model's and the empty circuit's metric are equal
    (see ``check_task``). ``batch_size`` and ``max_memory`` as for ``masked_metrics``.
    """
    import pandas as pd

    if scores.level == "node":
        raise CircuitsError("a faithfulness curve needs edge- or neuron-level scores")
    fractions = sorted(float(f) for f in fractions)
    if not fractions or fractions[0] <= 0 or fractions[-1] > 1:
        raise CircuitsError(f"fractions must lie in (0, 1], got {fractions}")
    total = len(scores)  # every unit of the scores' level: edges (at every span), or neurons
    sizes = [max(1, round(f * total)) for f in fractions]
    check_batch_size(batch_size)
    resolution = resolution_for(model, task, scores)
    plan = BatchPlan.of(batch_size, model.device, max_memory)  # both passes run the same batches
    frame, _, _ = masked_metrics(model, task, [], ablation, plan, resolution=resolution)
    full, empty = float(frame["full"].mean()), float(frame["empty"].mean())
    signed = [scores.most_helpful(n, task.higher_is_better).mask for n in sizes]
    absolute = [scores.top_n(n, absolute=True).mask for n in sizes]
    _, values, _ = masked_metrics(model, task, signed + absolute, ablation, plan, resolution=resolution)
    f = [faithfulness(float(v.mean()), full, empty) for v in values]
    curve = pd.DataFrame(
        {
            "fraction": fractions,
            "edges": sizes,
            "faithfulness": f[: len(sizes)],
            "faithfulness_absolute": f[len(sizes) :],
            "edges_after_pruning": [int(m.sum()) for m in signed],
        }
    )
    cpr = area(fractions, curve.faithfulness)
    cmd = area(fractions, (1 - curve.faithfulness_absolute).abs())
    meta = {**scores.meta, "full": full, "empty": empty, "ablation": ablation, "units": total}
    return Curve(curve, cpr, cmd, label or str(scores.meta.get("method", "")), meta)


def resolution_for(model: Model, task: Task, made: Scores | Circuit) -> Resolution:
    """What ``made`` (scores or a circuit) resolves, on ``task``: its level and, by span, the task's positions
    grouped by its spans."""
    resolution = spans_on(model, task, made.spans) if made.spans is not None else Resolution(made.level)
    shape = tuple(made.mask.shape if isinstance(made, Circuit) else made.tensor.shape)
    if shape != resolution.shape(model):
        raise CircuitsError(
            f"the {made.level}-level {type(made).__name__.lower()} has shape {list(shape)} but this model's "
            f"{made.level} units have shape {list(resolution.shape(model))}: it was made on another model"
        )
    return resolution


def roc_auc(scores: Scores | torch.Tensor, true_edges, absolute: bool = True, edges=None) -> float:
    """ROC AUC of edge scores (|score| unless ``absolute=False``) against a ground-truth edge set.

    Ties count one half (the Mann-Whitney statistic). ``true_edges``: names, a Circuit or a mask.
    ``edges`` (names, a Circuit or a mask) restricts the edges ranked; default every edge of the graph.
    """
    import pandas as pd

    if isinstance(scores, Scores):
        graph, values = scores.graph, scores.tensor
    else:
        raise CircuitsError("roc_auc needs circuits.Scores (edge level)")
    universe = _universe(graph, edges)
    truth = edge_mask_from(graph, true_edges)[universe]
    ranked = (values.abs() if absolute else values)[universe].nan_to_num(float("-inf"))
    positives, negatives = int(truth.sum()), int((~truth).sum())
    if positives == 0 or negatives == 0:
        raise CircuitsError(f"ROC AUC needs both true and false edges; got {positives} true of {len(truth)}")
    ranks = pd.Series(ranked.numpy()).rank(method="average").to_numpy()
    return float((ranks[truth.numpy()].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def roc_points(circuits: Sequence[Circuit], true_edges, edges=None) -> pd.DataFrame:
    """One (false positive rate, true positive rate) point per circuit against a ground-truth edge set."""
    import pandas as pd

    if not circuits:
        raise CircuitsError("roc_points needs at least one circuit")
    graph = circuits[0].graph
    universe = _universe(graph, edges)
    truth = edge_mask_from(graph, true_edges) & universe
    positives, negatives = int(truth.sum()), int((universe & ~truth).sum())
    if positives == 0 or negatives == 0:
        raise CircuitsError(f"a ROC needs both true and false edges; got {positives} true of {positives + negatives}")
    rows = []
    for circuit in circuits:
        kept = circuit.mask & universe
        rows.append(
            {
                "fpr": int((kept & ~truth).sum()) / negatives,
                "tpr": int((kept & truth).sum()) / positives,
                "edges": int(kept.sum()),
            }
        )
    return pd.DataFrame(rows)


def roc_auc_of_circuits(circuits: Sequence[Circuit], true_edges, edges=None) -> float:
    """ROC AUC of a family of circuits (ACDC over a sweep of thresholds, say), formed as the ACDC paper does.

    Each circuit is one point of ``roc_points``; with (0, 0) and (1, 1) added and the points sorted by
    false positive rate (then true positive rate), the area under the polyline (trapezoid rule) is the AUC.
    """
    import pandas as pd

    points = roc_points(circuits, true_edges, edges)
    curve = pd.concat([pd.DataFrame({"fpr": [0.0, 1.0], "tpr": [0.0, 1.0]}), points[["fpr", "tpr"]]])
    curve = curve.sort_values(["fpr", "tpr"])
    return area(curve.fpr.to_numpy(), curve.tpr.to_numpy())


def _universe(graph, edges) -> torch.Tensor:
    return graph.real.clone() if edges is None else edge_mask_from(graph, edges) & graph.real


def overlap(a: Circuit, b: Circuit) -> dict[str, float]:
    """Jaccard similarity of two circuits' edge sets and node sets."""
    edges_a, edges_b = set(a.edges), set(b.edges)
    nodes_a, nodes_b = set(a.nodes), set(b.nodes)

    def jaccard(x: set, y: set) -> float:
        return len(x & y) / len(x | y) if x | y else 1.0

    return {"edges": jaccard(edges_a, edges_b), "nodes": jaccard(nodes_a, nodes_b)}
