"""Position-aware circuits against position-agnostic ones, on SmolLM2-135M's IOI and greater-than.

    make positions                    # = .venv/bin/python results/positions/run.py [--tasks ioi] [--force]

Both kinds come from one method (EAP-IG-inputs, 5 steps) on the same ``N`` examples (seed 0, patching ablation,
logit difference): edge scores, and the same scores resolved by the task's spans (IOI: IO, S1, S1+1, S2, END;
greater-than: XX, YY, END; every other position in ``rest``). Sizes are counted in position-edges (an edge at
one span): a position-agnostic circuit of n edges keeps each at every span, n x S position-edges; a
position-aware one keeps K position-edges. Both are selected by the signed scores (MIB's CPR order), pruned
(by span for the position-aware ones), and evaluated by the same engine pass (``masked_metrics`` by span,
the agnostic masks repeated over the spans). Also CPR and CMD of each on MIB's grid, in its own units. One JSON
per task under runs/ (skipped when present unless --force); README.md, positions.png and the IOI circuit
(ioi_circuit.png, ioi_circuit.json) are rebuilt from them.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402

import circuits  # noqa: E402
from circuits import tasks  # noqa: E402
from circuits.circuit import Circuit  # noqa: E402
from circuits.evaluate import faithfulness, masked_metrics, resolution_for  # noqa: E402
from circuits.io import atomic_write_text  # noqa: E402
from circuits.plot import save_figure  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from finer import IG_STEPS, METHOD, MODEL, N, main  # noqa: E402

EDGE_BUDGETS = (10, 25, 50, 100, 200, 400, 800, 1600, 3200)  # edges of the position-agnostic circuits
IOI_CIRCUIT = 150  # position-edges of the drawn IOI circuit


def run_task(model: circuits.Model, name: str) -> dict:
    task = tasks.get(name, model.tokenizer, n=N, seed=0)
    start = time.perf_counter()
    edge_scores = circuits.attribute(model, task, METHOD, ig_steps=IG_STEPS, progress=False)
    edge_seconds = time.perf_counter() - start
    start = time.perf_counter()
    span_scores = circuits.attribute(model, task, METHOD, ig_steps=IG_STEPS, progress=False, positions=True)
    span_seconds = time.perf_counter() - start
    count = len(span_scores.spans)
    resolution = resolution_for(model, task, span_scores)
    agnostic = [edge_scores.most_helpful(n).mask for n in EDGE_BUDGETS]
    sizes = sorted({*EDGE_BUDGETS, *(n * count for n in EDGE_BUDGETS)})
    aware = [span_scores.most_helpful(k).mask for k in sizes]
    repeated = [mask[:, :, None].expand(-1, -1, count) for mask in agnostic]
    frame, values, _ = masked_metrics(model, task, repeated + aware, "patching", N, resolution=resolution)
    full, empty = float(frame["full"].mean()), float(frame["empty"].mean())
    f = [faithfulness(float(v.mean()), full, empty) for v in values]
    rows = [
        {"kind": "position-agnostic", "selected": n, "position_edges": int(mask.sum()) * count, "faithfulness": value}
        for n, mask, value in zip(EDGE_BUDGETS, agnostic, f[: len(agnostic)], strict=True)
    ] + [
        {"kind": "position-aware", "selected": k, "position_edges": int(mask.sum()), "faithfulness": value}
        for k, mask, value in zip(sizes, aware, f[len(agnostic) :], strict=True)
    ]
    curves = {}
    for label, scores in (("position-agnostic", edge_scores), ("position-aware", span_scores)):
        curve = circuits.faithfulness_curve(model, task, scores, batch_size=N)
        curves[label] = {"cpr": curve.cpr, "cmd": curve.cmd, "units": len(scores)}
    record = {
        "task": name,
        "model": MODEL,
        "n": N,
        "method": METHOD,
        "ig_steps": IG_STEPS,
        "spans": span_scores.spans.to_dict(),
        "full": full,
        "empty": empty,
        "edges": len(edge_scores),
        "position_edges": len(span_scores),
        "seconds": {"edge": edge_seconds, "by span": span_seconds},
        "rows": rows,
        "curves": curves,
    }
    if name == "ioi":
        circuit = span_scores.most_helpful(IOI_CIRCUIT)
        record["ioi_circuit"] = {
            "position_edges": len(circuit),
            "faithfulness": circuits.evaluate(model, task, circuit, batch_size=N).faithfulness,
        }
        circuit.save(HERE / "ioi_circuit.json", full=False)
    return record


def rebuild(records: list[dict]) -> None:
    fig, axes = plt.subplots(1, len(records), figsize=(5.2 * len(records), 3.6), squeeze=False)
    for ax, record in zip(axes[0], records, strict=True):
        for kind, colour in (("position-agnostic", "#7A7A7A"), ("position-aware", "#0072B2")):
            rows = sorted((r for r in record["rows"] if r["kind"] == kind), key=lambda r: r["position_edges"])
            xs = [r["position_edges"] for r in rows]
            ax.plot(xs, [r["faithfulness"] for r in rows], marker="o", ms=3, color=colour, label=kind)
        ax.set_xscale("log")
        ax.axhline(1, color="#CCCCCC", lw=0.8)
        ax.set_xlabel("position-edges kept (after pruning)")
        ax.set_ylabel("faithfulness")
        spans = ", ".join(record["spans"]["names"])
        ax.set_title(f"{record['task']} (spans: {spans})", fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, HERE / "positions.png")
    if (HERE / "ioi_circuit.json").exists():
        circuit = Circuit.load(HERE / "ioi_circuit.json")
        circuit.plot(HERE / "ioi_circuit.png", title=f"IOI, SmolLM2-135M: {len(circuit)} position-edges (EAP-IG)")
    atomic_write_text(HERE / "README.md", readme(records))


def readme(records: list[dict]) -> str:
    lines = [
        "# Position-aware against position-agnostic circuits",
        "",
        f"SmolLM2-135M (fp32, CPU), {N} examples per task (seed 0), patching ablation, logit difference, "
        f"{METHOD} ({IG_STEPS} steps). Made by `make positions` (`results/positions/run.py`, whose docstring says "
        "how); every number below is in `runs/<task>.json`.",
        "",
        "A position-edge is an edge at one span. A position-agnostic circuit of n edges keeps each edge at every "
        "span (n x S position-edges); a position-aware circuit keeps K position-edges, chosen by the scores resolved "
        "by span. Both pruned, both evaluated by the same engine pass.",
        "",
    ]
    for record in records:
        count = len(record["spans"]["names"])
        aware = {r["selected"]: r for r in record["rows"] if r["kind"] == "position-aware"}
        lines += [
            f"## {record['task']}",
            "",
            f"Spans: {', '.join(record['spans']['names'])} (S = {count}); {record['edges']:,} edges, "
            f"{record['position_edges']:,} position-edges. Full model {record['full']:.3f}, empty circuit "
            f"{record['empty']:.3f}. Scoring took {record['seconds']['edge']:.1f} s by edge and "
            f"{record['seconds']['by span']:.1f} s by span.",
            "",
            "| agnostic edges n | its position-edges | faithfulness, agnostic | aware, same position-edges "
            "| aware, n position-edges |",
            "|---:|---:|---:|---:|---:|",
        ]
        for row in (r for r in record["rows"] if r["kind"] == "position-agnostic"):
            n = row["selected"]
            same, few = aware.get(n * count), aware.get(n)
            lines.append(
                f"| {n} | {row['position_edges']:,} | {row['faithfulness']:.3f} | "
                f"{same['faithfulness']:.3f} ({same['position_edges']:,}) | {few['faithfulness']:.3f} "
                f"({few['position_edges']:,}) |"
            )
        curves = record["curves"]
        lines += [
            "",
            "(in parentheses: position-edges kept after pruning)",
            "",
            f"CPR / CMD on MIB's grid, each in its own units: position-agnostic "
            f"{curves['position-agnostic']['cpr']:.3f} / {curves['position-agnostic']['cmd']:.3f}; position-aware "
            f"{curves['position-aware']['cpr']:.3f} / {curves['position-aware']['cmd']:.3f}.",
            "",
        ]
        if "ioi_circuit" in record:
            circuit = record["ioi_circuit"]
            lines += [
                f"The IOI circuit of {IOI_CIRCUIT} position-edges ({circuit['position_edges']} after pruning, "
                f"faithfulness {circuit['faithfulness']:.3f}) is drawn in `ioi_circuit.png` (one column per span; "
                "edges into keys and values cross to the span their head reads at) and saved as `ioi_circuit.json`.",
                "",
            ]
    lines += ["![faithfulness against position-edges](positions.png)", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main(HERE, __doc__.splitlines()[0], run_task, rebuild)
