"""Discovery end to end, as the `circuits` command and `make demo` run it: score, select, evaluate, write a folder.

An output folder holds ``circuit.json`` (the circuit's own edges and nodes with their scores, plus
``meta``; every edge of the graph in the EAP-IG/MIB layout with ``full_json``), ``scores.csv`` (every
edge's score), ``circuit.png`` and ``circuit.pdf``, ``faithfulness.png``, ``summary.json`` (settings,
sizes, metric values, CPR/CMD, seconds per phase, versions; ``notes`` on values that are undefined and
written as null) and ``summary.md``. The folder is written all at once (``circuits.io.atomic_folder``):
a reader, or a run killed half-way, never leaves it half-updated. JSON files are strict (no NaN).
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pandas as pd

from . import distributed, export
from .batching import BatchPlan, BatchSize, check_batch_size, parse_memory
from .choices import (
    CIRCUIT_LEVELS,
    SELECTIONS,
    Ablation,
    Backward,
    Method,
    MetricName,
    Selection,
    check_choice,
    check_positive,
)
from .circuit import Circuit, Scores, greedy_mask, select
from .errors import CircuitsError
from .evaluate import Curve, Evaluation, check_task, evaluate, faithfulness_curve, metrics_equal
from .export import versions
from .io import atomic_folder, atomic_write_text, check_writable_folder, finite_json, recover_folder, write_json
from .methods import acdc, attribute, check_backward, check_gradient_metric
from .methods.gradient import GRADIENT_METHODS
from .model import Model
from .resume import checkpoint_folder
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
    if scores.spans is not None:
        raise CircuitsError("greedy selection grows whole edges: choose signed or absolute with positions")
    return select(scores, greedy_mask(scores, n), f"greedy({n})")


def check_granularity(positions: bool, level: str, selection: str, acdc: bool) -> None:
    """A CircuitsError for a discovery whose granularity its other settings cannot serve: greedy selection grows
    whole edges; ACDC searches edges; positions resolve edges."""
    check_choice("level", level, CIRCUIT_LEVELS)
    if positions and selection == "greedy":
        raise CircuitsError("with positions the circuit is selected by signed or absolute scores, not greedy")
    if level != "edge" and (positions or acdc or selection == "greedy"):
        raise CircuitsError(
            f"a {level}-level circuit is the best neurons by signed or absolute scores: no positions, ACDC or greedy"
        )


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
    batch_size: BatchSize = 32,
    ig_steps: int = 5,
    progress: bool = True,
    log: Callable[[str], None] = print,
    full_json: bool = False,
    checkpoint: str | Path | None = None,
    max_memory: int | str | None = None,
    backward: Backward = "gradient",
    positions: bool = False,
    level: str = "edge",
) -> dict[str, Any]:
    """Find ``task``'s circuit in ``model`` and write the output folder ``out``; returns the summary.

    ``positions``: every method scores edges by span (``circuits.attribute(..., positions=True)``), the circuit
    keeps ``top_n`` edges at a span (or ACDC searches edges at a span) and is pruned span by span (not with
    greedy selection). ``level``: ``"neuron"`` or ``"mlp-neuron"`` make the circuit the ``top_n`` best output
    dimensions or MLP hidden units (``circuits.attribute(..., level=...)``), evaluated with every other one patched.

    ``method`` scores every edge; the circuit is its ``top_n`` edges chosen by ``selection``, or, with
    ``acdc_threshold``, ACDC (on ``acdc_metric``) run on the method's ``candidates`` best edges, chosen
    by the same ``selection``. ``compare`` adds other attribution methods to the faithfulness figure and
    the summary's CPR/CMD. ``full_json`` writes every edge into circuit.json (the layout EAP-IG and
    MIB read) instead of the circuit's own. ``batch_size`` is a number of examples or ``"auto"``: as many as fit
    ``max_memory`` (default: what the device has free), see ``circuits.batching``. The attribution lays the
    batches out (and its checkpoint records them); ACDC, the evaluation and the curves run the same batches,
    so a resumed run gives identical numbers in every phase.

    ``backward`` is the main method's backward pass (``circuits.attribute``: ``gim``, ``relp``, modified
    backward rules for the gradient methods); the ``compare`` methods take plain gradients.

    ``checkpoint``: a folder for the resumable state of every long phase (``circuits.resume``), one file
    each: ``attribution.ckpt`` (the main attribution), ``attribution-METHOD.ckpt`` (each ``compare``
    method), ``acdc.ckpt``; ``run.ckpt`` holds the run's fingerprint (model, task, method, ablation, batch
    size, ig_steps, the ACDC settings). Calling again with the same folder resumes each phase where it
    stopped and writes identical outputs; a call whose fingerprint differs fails (CircuitsError naming
    what differs) before any phase runs. Settings that change no phase's result (``top_n`` without
    ACDC, ``compare``, ``full_json``, ``out``) may differ between calls.

    ``out`` is written all at once at the end (``circuits.io.atomic_folder``): until then it keeps what
    it held, and a run that fails or is killed leaves it as it was. It is replaced as a whole, so it may
    be missing, an empty folder, or the folder of an earlier run (it has summary.json), whose files are
    all gone afterwards, files you added to it included; a folder holding other files is refused
    (CircuitsError) before the model runs, as is a task whose corrupted prompts do not change the
    metric (``circuits.evaluate.check_task``): nothing could be attributed.
    """
    check_choice("selection", selection, SELECTIONS)
    check_positive("top_n", top_n)
    check_positive("candidates", candidates)
    check_batch_size(batch_size)
    parse_memory(max_memory)
    out = Path(out)
    distributed.on_main(partial(check_output_folder, out), f"checking the output folder {out}")
    for name in (method, *compare):  # before any work: a pair whose gradients are all zero is refused
        check_gradient_metric(name, task.metric, ig_steps)
    check_backward(method, backward)
    check_granularity(positions, level, selection, acdc_threshold is not None)
    settings = dict(method=method, ablation=ablation, batch_size=batch_size, ig_steps=ig_steps, backward=backward)
    settings.update(positions=positions, level=level)
    settings.update(acdc_threshold=acdc_threshold, acdc_metric=acdc_metric, candidates=candidates, selection=selection)
    if checkpoint is not None and out.resolve() in (Path(checkpoint).resolve(), *Path(checkpoint).resolve().parents):
        raise CircuitsError(f"checkpoint folder {checkpoint} is inside the output folder {out}, which is replaced")
    folder = checkpoint_folder(checkpoint, model, task, _run_settings(settings))
    phases = Phases(log)
    with phases("task check", "checking that the corrupted prompts change the metric"):
        check_task(model, task, ablation, batch_size, max_memory)
    plan = BatchPlan(batch_size, model.device, max_memory)  # one layout for every later phase
    options = {"ablation": ablation, "batch_size": plan, "ig_steps": ig_steps, "progress": progress}
    options.update(positions=positions, level=level)
    with phases("attribution", f"scoring {len(model.graph):,} edges with {method} ({len(task)} examples)"):
        scores = attribute(model, task, method, **options, checkpoint=_phase(folder, "attribution"), backward=backward)
    with phases("selection", "selecting the circuit"):
        if acdc_threshold is None:
            circuit = select_circuit(scores, top_n, selection)
        else:
            pool = select_circuit(scores, min(candidates, len(scores)), selection)
            found = acdc(
                model,
                task,
                acdc_threshold,
                metric=acdc_metric,
                ablation=ablation,
                candidates=pool,
                progress=progress,
                batch_size=plan,
                checkpoint=_phase(folder, "acdc"),
                positions=positions,
            )
            circuit = Circuit(model.graph, found.mask, scores=scores.tensor, meta=found.meta, spans=found.spans)
            circuit.meta.update({"method": f"acdc on {method} candidates", "candidates": len(pool)})
    circuit.meta.update({"model": model.name, "task": task.name, "ablation": ablation})
    with phases("evaluation", f"evaluating the {len(circuit)}-edge circuit"):
        evaluation = evaluate(model, task, circuit, ablation, plan)
    curves = []
    for name in (method, *[m for m in compare if m != method]):
        other = scores if name == method else None
        if other is None:
            with phases(f"attribution ({name})", f"scoring with {name} for comparison"):
                other = attribute(model, task, name, **options, checkpoint=_phase(folder, f"attribution-{name}"))
        with phases(f"curve ({name})", f"faithfulness curve of {name}"):
            curves.append(faithfulness_curve(model, task, other, ablation=ablation, batch_size=plan))
    how = {"selection": selection}
    if backward != "gradient":
        how["backward"] = backward
    if acdc_threshold is not None:
        how.update({"acdc_threshold": acdc_threshold, "acdc_metric": acdc_metric, "candidates": len(pool)})
    if not distributed.is_main():  # rank 0 writes the folder
        return _summary(model, task, scores, circuit, evaluation, curves, phases.seconds, how)
    with atomic_folder(out) as staging:
        with phases("writing", f"writing {out}"):
            title = f"{model.name} {task.name}: {circuit.meta['method']}"
            circuit.save(staging / "circuit.json", full=full_json)
            atomic_write_text(staging / "scores.csv", scores.to_frame().to_csv(index=False))
            circuit.plot(staging / "circuit.png", title=title)
            circuit.plot(staging / "circuit.pdf", title=title)
            curves[0].plot(path=staging / "faithfulness.png", others=curves[1:])
        summary = _summary(model, task, scores, circuit, evaluation, curves, phases.seconds, how)
        write_summary(staging, summary)
    return summary


def _run_settings(arguments: dict[str, Any]) -> dict[str, Any]:
    """Those of ``discover``'s ``arguments`` that determine a checkpointed phase's result (for ``run.ckpt``)."""
    settings = {key: arguments[key] for key in ("method", "ablation", "batch_size")}
    method = GRADIENT_METHODS.get(arguments["method"])
    if method is not None and method.uses_steps:
        settings["ig_steps"] = arguments["ig_steps"]
    if arguments.get("backward", "gradient") != "gradient":  # absent for plain gradients: old folders stay valid
        settings["backward"] = arguments["backward"]
    if arguments.get("positions"):  # likewise absent without positions
        settings["positions"] = True
    if arguments.get("level", "edge") != "edge":  # and at the edge level
        settings["level"] = arguments["level"]
    settings["acdc_threshold"] = arguments["acdc_threshold"]
    if arguments["acdc_threshold"] is not None:
        settings.update({key: arguments[key] for key in ("acdc_metric", "candidates", "selection")})
    return settings


def _phase(folder: Path | None, name: str) -> Path | None:
    """The checkpoint file of a phase in the checkpoint folder (None without one)."""
    return None if folder is None else folder / f"{name}.ckpt"


def check_output_folder(out: Path) -> None:
    """CircuitsError unless ``discover`` may replace ``out`` as a whole: missing, an empty folder, or an earlier
    run's folder (it has summary.json). Leftovers of a killed earlier run are cleared first (``recover_folder``)."""
    if out.exists() and not out.is_dir():
        raise CircuitsError(f"output path {out} exists and is not a folder")
    check_writable_folder(out)
    recover_folder(out)
    if out.is_dir() and any(out.iterdir()) and not (out / "summary.json").is_file():
        raise CircuitsError(
            f"output folder {out} holds files but no summary.json, so it is not an earlier run's output; the run "
            "would replace it as a whole: remove it or choose another folder"
        )


def write_summary(out: Path, summary: dict[str, Any]) -> None:
    """summary.json and summary.md into ``out``. summary.json is strict JSON: an undefined (NaN) value is written
    as null and ``summary["notes"]`` gets a line saying so (``undefined_notes``); summary.md says "undefined"."""
    summary["notes"] = list(dict.fromkeys([*summary.get("notes", []), *undefined_notes(summary)]))
    write_json(out / "summary.json", summary)
    atomic_write_text(out / "summary.md", summary_markdown(summary))


def undefined_notes(summary: dict[str, Any]) -> list[str]:
    """A line for each value of ``summary`` that is undefined (NaN or infinite: null in summary.json), with the
    reason when it is known; the undefined points of one curve make one line."""
    _, undefined = finite_json(summary)
    e = summary.get("evaluation", summary)  # discover's summary, or evaluate's flat evaluation.json
    full, empty = e.get("metric_full"), e.get("metric_empty")
    reason = ""
    if isinstance(full, float) and isinstance(empty, float) and metrics_equal(full, empty):
        reason = ": the full and empty metric are equal"
    points: dict[str, int] = {}  # key -> undefined points of its list (0: the key's own value)
    for key in undefined:
        element = re.fullmatch(r"(.*)\[\d+\]", key)
        base = element[1] if element else key
        points[base] = points.get(base, 0) + (1 if element else 0)
    notes = []
    for key, n in points.items():
        name = key.removeprefix("evaluation.")
        notes.append(f"{name} is undefined (null){f' at {n} of its points' if n else ''}{reason}")
    return notes


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
            "level": circuit.level,
            "edges": len(circuit),  # units: edges (at a span), or neurons
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
        "world_size": distributed.world_size(),
        "versions": versions(),
        "files": list(FILES),
    }


def _top_edges(circuit: Circuit, n: int) -> list[dict[str, Any]]:
    frame = circuit.to_frame()
    if "score" not in frame or frame.empty:
        return []
    frame = frame.reindex(frame["score"].abs().sort_values(ascending=False).index).head(n)
    names = frame["edge"] if "edge" in frame else frame["name"]  # neuron frames name their units
    return [{"edge": names[index], "score": float(frame.score[index])} for index in frame.index]


def unit_word(circuit_summary: dict[str, Any]) -> str:
    """What a summary's circuit counts: edges, or the neurons of its level."""
    return {"neuron": "output dimensions", "mlp-neuron": "MLP hidden units"}.get(circuit_summary.get("level"), "edges")


def summary_markdown(summary: dict[str, Any]) -> str:
    """The summary as a short Markdown report (settings, circuit, faithfulness, CPR/CMD, timings, notes); a value
    that is undefined (NaN, or null as summary.json has it) reads "undefined"."""
    e, c = summary["evaluation"], summary["circuit"]
    lines = [
        f"# {summary['task']} on {summary['model']}",
        "",
        f"- method: {summary['method']}, ablation: {summary['ablation']}, metric: {summary['metric']}, "
        f"examples: {summary['n']}",
        f"- circuit: {c['edges']} {unit_word(c)}, {c['nodes']} nodes (graph: {summary['graph']['edges']:,} edges)",
        f"- faithfulness: {number_text(e['faithfulness'])} (metric full {number_text(e['metric_full'])}, circuit "
        f"{number_text(e['metric_circuit'])}, empty {number_text(e['metric_empty'])}); circuit accuracy "
        f"{number_text(e['accuracy_circuit'])}",
        *[f"- note: {note}" for note in summary.get("notes", [])],
        "",
        "| method | CPR (higher is better) | CMD (lower is better) |",
        "|---|---|---|",
        *[f"| {label} | {number_text(v['cpr'])} | {number_text(v['cmd'])} |" for label, v in summary["curves"].items()],
        "",
        "| phase | seconds |",
        "|---|---|",
        *[f"| {phase} | {seconds:.1f} |" for phase, seconds in summary["seconds"].items()],
        "",
        "Top edges by |score|:",
        "",
        "| edge | score |",
        "|---|---|",
        *[f"| `{row['edge']}` | {number_text(row['score'], '.4f')} |" for row in c["top_edges"]],
        "",
        "![circuit](circuit.png)",
        "",
        "![faithfulness](faithfulness.png)",
        "",
    ]
    return "\n".join(lines)


def number_text(value: float | None, spec: str = ".3f") -> str:
    """``value`` formatted by ``spec``, or "undefined" for None (null in JSON), NaN and infinities."""
    return format(value, spec) if value is not None and math.isfinite(value) else "undefined"


def scores_for(circuit: Circuit, scores_csv: Path | None) -> Scores | None:
    """Every edge's score for a circuit's curve: from the circuit file when it carries them all (the full
    layout), else from ``scores_csv`` (discover's scores.csv) when given; None when neither has them."""
    meta = {**circuit.meta, "method": circuit.meta.get("method", "scores")}
    if circuit.scores is not None:
        scores = Scores(circuit.graph, circuit.scores, circuit.level, meta, circuit.spans)
        if not bool(scores.values().isnan().any()):
            return scores
    if scores_csv is None or circuit.level != "edge" or circuit.spans is not None:
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
