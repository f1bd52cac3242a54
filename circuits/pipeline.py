"""Discovery end to end, as the `circuits` command and `make demo` run it: score, select, evaluate, write a folder.

An output folder holds ``circuit.json`` (the circuit's own edges and nodes with their scores, plus
``meta``; every edge of the graph in the EAP-IG/MIB layout with ``full_json``), ``scores.csv`` (every
edge's score), ``circuit.png`` and ``circuit.pdf``, ``faithfulness.png``, ``summary.json`` (settings,
sizes, metric values, CPR/CMD, seconds per phase, versions) and ``summary.md``. Every file is written
atomically.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd

from . import export
from .choices import SELECTIONS, Ablation, Method, MetricName, Selection, check_choice, check_positive
from .circuit import Circuit, Scores, greedy_mask, select
from .errors import CircuitsError
from .evaluate import Curve, Evaluation, evaluate, faithfulness_curve
from .export import versions
from .io import atomic_write_text
from .methods import acdc, attribute
from .model import Model
from .task import Task

FILES = ("circuit.json", "scores.csv", "circuit.png", "circuit.pdf", "faithfulness.png", "summary.json", "summary.md")


class Phases:
    """Wall time of each named phase, and a line to ``log`` as each one starts."""

    def __init__(self, log: Callable[[str], None]):
        self.seconds: dict[str, float] = {}
        self.log = log

    @contextmanager
    def __call__(self, name: str, what: str):
        self.log(what)
        start = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - start, 2)


def select_circuit(scores: Scores, n: int, how: Selection) -> Circuit:
    """The ``n``-edge circuit by ``how``: ``signed`` (the edges whose ablation hurts the task most, the CPR
    ordering), ``absolute`` (largest |score|) or ``greedy`` (grown from the logits by |score|); pruned."""
    check_choice("selection", how, SELECTIONS)
    check_positive("top_n", n)
    if how == "signed":
        return scores.most_helpful(n)
    if how == "absolute":
        return scores.top_n(n)
    return select(scores, greedy_mask(scores, n), f"greedy({n})")


def discover(
    model: Model,
    task: Task,
    out: str | Path,
    method: Method = "eap-ig-inputs",
    ablation: Ablation = "patching",
    top_n: int = 200,
    selection: Selection = "signed",
    acdc_threshold: float | None = None,
    candidates: int = 500,
    acdc_metric: MetricName = "kl",
    compare: Sequence[str] = (),
    batch_size: int = 32,
    ig_steps: int = 5,
    progress: bool = True,
    log: Callable[[str], None] = print,
    full_json: bool = False,
) -> dict[str, Any]:
    """Find ``task``'s circuit in ``model`` and write the output folder ``out``; returns the summary.

    ``method`` scores every edge; the circuit is its ``top_n`` edges chosen by ``selection``, or, with
    ``acdc_threshold``, ACDC (on ``acdc_metric``) run on the method's ``candidates`` best edges, chosen
    by the same ``selection``. ``compare`` adds other attribution methods to the faithfulness figure and
    the summary's CPR/CMD. ``full_json`` writes every edge into circuit.json (the layout EAP-IG and
    MIB read) instead of the circuit's own.
    """
    check_choice("selection", selection, SELECTIONS)
    check_positive("top_n", top_n)
    check_positive("candidates", candidates)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CircuitsError(f"output path {out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    phases = Phases(log)
    options = {"ablation": ablation, "batch_size": batch_size, "ig_steps": ig_steps, "progress": progress}
    with phases("attribution", f"scoring {len(model.graph):,} edges with {method} ({len(task)} examples)"):
        scores = attribute(model, task, method, **options)
    with phases("selection", "selecting the circuit"):
        if acdc_threshold is None:
            circuit = select_circuit(scores, top_n, selection)
        else:
            pool = select_circuit(scores, min(candidates, len(model.graph)), selection)
            found = acdc(
                model,
                task,
                acdc_threshold,
                metric=acdc_metric,
                ablation=ablation,
                candidates=pool,
                progress=progress,
                batch_size=batch_size,
            )
            circuit = Circuit(model.graph, found.mask, scores=scores.tensor, meta=found.meta)
            circuit.meta.update({"method": f"acdc on {method} candidates", "candidates": len(pool)})
    circuit.meta.update({"model": model.name, "task": task.name, "ablation": ablation})
    with phases("evaluation", f"evaluating the {len(circuit)}-edge circuit"):
        evaluation = evaluate(model, task, circuit, ablation, batch_size)
    curves = []
    for name in (method, *[m for m in compare if m != method]):
        other = scores if name == method else None
        if other is None:
            with phases(f"attribution ({name})", f"scoring with {name} for comparison"):
                other = attribute(model, task, name, **options)
        with phases(f"curve ({name})", f"faithfulness curve of {name}"):
            curves.append(faithfulness_curve(model, task, other, ablation=ablation, batch_size=batch_size))
    with phases("writing", f"writing {out}"):
        title = f"{model.name} {task.name}: {circuit.meta['method']}"
        circuit.save(out / "circuit.json", full=full_json)
        atomic_write_text(out / "scores.csv", scores.to_frame().to_csv(index=False))
        circuit.plot(out / "circuit.png", title=title)
        circuit.plot(out / "circuit.pdf", title=title)
        curves[0].plot(path=out / "faithfulness.png", others=curves[1:])
    how = {"selection": selection}
    if acdc_threshold is not None:
        how.update({"acdc_threshold": acdc_threshold, "acdc_metric": acdc_metric, "candidates": len(pool)})
    summary = _summary(model, task, scores, circuit, evaluation, curves, phases.seconds, how)
    write_summary(out, summary)
    return summary


def write_summary(out: Path, summary: dict[str, Any]) -> None:
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1))
    atomic_write_text(out / "summary.md", summary_markdown(summary))


def _summary(
    model: Model,
    task: Task,
    scores: Scores,
    circuit: Circuit,
    evaluation: Evaluation,
    curves: list[Curve],
    seconds: dict[str, float],
    how: dict[str, Any],
) -> dict[str, Any]:
    graph = model.graph
    return {
        "model": model.name,
        "task": task.name,
        "n": len(task),
        "metric": task.metric if isinstance(task.metric, str) else "custom",
        "method": scores.meta["method"],
        "ablation": scores.meta["ablation"],
        **how,
        "graph": {"edges": len(graph), "nodes": graph.n_src + 1},
        "circuit": {
            "edges": len(circuit),
            "nodes": len(circuit.nodes),
            **circuit.meta.get("selection", {}),
            "top_edges": _top_edges(circuit, 10),
        },
        "evaluation": {
            "faithfulness": evaluation.faithfulness,
            "metric_full": evaluation.full,
            "metric_circuit": evaluation.circuit,
            "metric_empty": evaluation.empty,
            "accuracy_circuit": evaluation.accuracy,
        },
        "curves": {
            curve.label: {"cpr": curve.cpr, "cmd": curve.cmd, "curve": curve.frame.to_dict(orient="list")}
            for curve in curves
        },
        "seconds": seconds,
        "versions": versions(),
        "files": list(FILES),
    }


def _top_edges(circuit: Circuit, n: int) -> list[dict[str, Any]]:
    frame = circuit.to_frame()
    if "score" not in frame or frame.empty:
        return []
    frame = frame.reindex(frame["score"].abs().sort_values(ascending=False).index).head(n)
    return [{"edge": row.edge, "score": float(row.score)} for row in frame.itertuples()]


def summary_markdown(summary: dict[str, Any]) -> str:
    """The summary as a short Markdown report (settings, circuit, faithfulness, CPR/CMD, timings)."""
    e, c = summary["evaluation"], summary["circuit"]
    lines = [
        f"# {summary['task']} on {summary['model']}",
        "",
        f"- method: {summary['method']}, ablation: {summary['ablation']}, metric: {summary['metric']}, "
        f"examples: {summary['n']}",
        f"- circuit: {c['edges']} edges, {c['nodes']} nodes (graph: {summary['graph']['edges']:,} edges)",
        f"- faithfulness: {e['faithfulness']:.3f} (metric full {e['metric_full']:.3f}, circuit "
        f"{e['metric_circuit']:.3f}, empty {e['metric_empty']:.3f}); circuit accuracy {e['accuracy_circuit']:.3f}",
        "",
        "| method | CPR (higher is better) | CMD (lower is better) |",
        "|---|---|---|",
        *[f"| {label} | {v['cpr']:.3f} | {v['cmd']:.3f} |" for label, v in summary["curves"].items()],
        "",
        "| phase | seconds |",
        "|---|---|",
        *[f"| {phase} | {seconds:.1f} |" for phase, seconds in summary["seconds"].items()],
        "",
        "Top edges by |score|:",
        "",
        "| edge | score |",
        "|---|---|",
        *[f"| `{row['edge']}` | {row['score']:.4f} |" for row in c["top_edges"]],
        "",
        "![circuit](circuit.png)",
        "",
        "![faithfulness](faithfulness.png)",
        "",
    ]
    return "\n".join(lines)


def scores_for(circuit: Circuit, scores_csv: Path | None) -> Scores | None:
    """Every edge's score for a circuit's curve: from the circuit file when it carries them all (the full
    layout), else from ``scores_csv`` (discover's scores.csv) when given; None when neither has them."""
    meta = {**circuit.meta, "method": circuit.meta.get("method", "scores")}
    if circuit.scores is not None and not bool(circuit.scores[circuit.graph.real].isnan().any()):
        return Scores(circuit.graph, circuit.scores, meta=meta)
    if scores_csv is None:
        return None
    return Scores(circuit.graph, export.read_scores_csv(scores_csv, circuit.graph), meta=meta)


def frame_of(summary: dict[str, Any]) -> pd.DataFrame:
    """One row of a results table from a summary."""
    e, c = summary["evaluation"], summary["circuit"]
    curve = summary["curves"].get(summary["method"], {})
    return pd.DataFrame(
        [
            {
                "task": summary["task"],
                "method": summary["method"],
                "edges": c["edges"],
                "nodes": c["nodes"],
                "faithfulness": e["faithfulness"],
                "cpr": curve.get("cpr"),
                "cmd": curve.get("cmd"),
                "seconds": sum(summary["seconds"].values()),
            }
        ]
    )
