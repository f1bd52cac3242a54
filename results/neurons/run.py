"""Neuron-level circuits against node-level ones at equal numbers of neurons, on SmolLM2-135M's IOI and
greater-than.

    make neurons                      # = .venv/bin/python results/neurons/run.py [--tasks ioi] [--force]

One method (EAP-IG-inputs, 5 steps) on the same ``N`` examples (seed 0, patching ablation, logit difference)
scores two granularities of units, each against the whole nodes it refines:
- ``neuron``: every output dimension of every source (576 per head, MLP and the input); a node-level circuit of
  m sources keeps all 576 dimensions of each, so it is compared with the neuron-level circuit of m x 576
  dimensions. Everything outside a circuit is patched (the empty circuit: every source patched).
- ``mlp-neuron``: every MLP hidden unit (1536 per layer); a circuit of m whole MLPs against the one of m x 1536
  hidden units. Attention is kept whole (the empty circuit: every hidden unit patched, every head kept).
Nodes are ranked by their score (a node's score is the sum of its neurons': the scores are additive), neurons by
theirs, both in the signed order (MIB's CPR order); both kinds evaluated by the same engine pass. Also CPR and
CMD of the neuron-level scores on MIB's grid of fractions of all neurons. One JSON per task under runs/
(skipped when present unless --force); README.md, neurons.png and top_neurons.png are rebuilt from them.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import circuits  # noqa: E402
from circuits import tasks  # noqa: E402
from circuits.circuit import helpful_sign  # noqa: E402
from circuits.evaluate import faithfulness, masked_metrics  # noqa: E402
from circuits.io import atomic_write_text  # noqa: E402
from circuits.methods.common import Resolution  # noqa: E402
from circuits.plot import plot_neurons, save_figure  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from finer import IG_STEPS, METHOD, MODEL, N, main  # noqa: E402

NODE_BUDGETS = {"neuron": (1, 2, 5, 10, 20, 50, 100, 200), "mlp-neuron": (1, 2, 4, 8, 16)}


def compare(model: circuits.Model, task: circuits.Task, scores: circuits.Scores) -> dict:
    """Faithfulness of the top-m nodes (whole rows) and of the top m x width neurons, for each node budget m."""
    level, width = scores.level, scores.tensor.shape[1]
    sign = helpful_sign(task.higher_is_better, task.metric)
    node_order = (scores.tensor.sum(1) * sign).argsort(descending=True, stable=True)
    node_masks, neuron_masks = [], []
    for m in NODE_BUDGETS[level]:
        rows = torch.zeros(scores.tensor.shape, dtype=torch.bool)
        rows[node_order[:m]] = True
        node_masks.append(rows)
        neuron_masks.append(scores.most_helpful(m * width).mask)
    frame, values, _ = masked_metrics(
        model, task, node_masks + neuron_masks, "patching", N, resolution=Resolution(level)
    )
    full, empty = float(frame["full"].mean()), float(frame["empty"].mean())
    f = [faithfulness(float(v.mean()), full, empty) for v in values]
    budgets = NODE_BUDGETS[level]
    curve = circuits.faithfulness_curve(model, task, scores, batch_size=N)
    return {
        "width": width,
        "units": len(scores),
        "full": full,
        "empty": empty,
        "rows": [
            {"nodes": m, "neurons": m * width, "faithfulness_nodes": a, "faithfulness_neurons": b}
            for m, a, b in zip(budgets, f[: len(budgets)], f[len(budgets) :], strict=True)
        ],
        "cpr": curve.cpr,
        "cmd": curve.cmd,
    }


def run_task(model: circuits.Model, name: str) -> dict:
    task = tasks.get(name, model.tokenizer, n=N, seed=0)
    record = {"task": name, "model": MODEL, "n": N, "method": METHOD, "ig_steps": IG_STEPS, "levels": {}}
    for level in NODE_BUDGETS:
        start = time.perf_counter()
        scores = circuits.attribute(model, task, METHOD, ig_steps=IG_STEPS, level=level, progress=False)
        seconds = time.perf_counter() - start
        record["levels"][level] = {**compare(model, task, scores), "seconds": seconds}
        if name == "ioi" and level == "neuron":
            top = scores.to_frame().assign(magnitude=lambda f: f.score.abs()).nlargest(20, "magnitude")
            record["top_neurons"] = top[["name", "score"]].to_dict("records")
            plot_neurons(scores, HERE / "top_neurons.png", top=30, title="IOI, SmolLM2-135M: top 30 output dimensions")
    return record


def rebuild(records: list[dict]) -> None:
    fig, axes = plt.subplots(len(NODE_BUDGETS), len(records), figsize=(5 * len(records), 6.4), squeeze=False)
    for column, record in enumerate(records):
        for row, level in enumerate(NODE_BUDGETS):
            ax, data = axes[row][column], record["levels"][level]
            xs = [r["neurons"] for r in data["rows"]]
            whole, parts = ("whole nodes", "output dimensions") if level == "neuron" else ("whole MLPs", "hidden units")
            for key, colour, label in (("nodes", "#7A7A7A", whole), ("neurons", "#0072B2", parts)):
                values = [r[f"faithfulness_{key}"] for r in data["rows"]]
                ax.plot(xs, values, marker="o", ms=3, color=colour, label=label)
            ax.set_xscale("log")
            ax.minorticks_off()
            ax.set_xticks(xs, [f"{x:,}" for x in xs], fontsize=7)
            ax.axhline(1, color="#CCCCCC", lw=0.8)
            ax.set_xlabel("neurons kept")
            ax.set_ylabel("faithfulness")
            ax.set_title(f"{record['task']}: {level}", fontsize=9)
            ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, HERE / "neurons.png")
    atomic_write_text(HERE / "README.md", readme(records))


def readme(records: list[dict]) -> str:
    lines = [
        "# Neuron-level against node-level circuits",
        "",
        f"SmolLM2-135M (fp32, CPU), {N} examples per task (seed 0), patching ablation, logit difference, "
        f"{METHOD} ({IG_STEPS} steps). Made by `make neurons` (`results/neurons/run.py`, whose docstring says how); "
        "every number below is in `runs/<task>.json`.",
        "",
        "At each budget both circuits keep the same number of neurons: m whole nodes (all their neurons) against "
        "the m x width best neurons wherever they are. `neuron`: the output dimensions of every source (width 576; "
        "everything else patched). `mlp-neuron`: the MLPs' hidden units (width 1536; attention kept whole).",
        "",
    ]
    for record in records:
        lines += [f"## {record['task']}", ""]
        for level, data in record["levels"].items():
            lines += [
                f"**{level}** ({data['units']:,} units; full model {data['full']:.3f}, empty {data['empty']:.3f}; "
                f"scored in {data['seconds']:.1f} s; CPR {data['cpr']:.3f}, CMD {data['cmd']:.3f} on MIB's grid)",
                "",
                "| nodes m | neurons | faithfulness, whole nodes | faithfulness, best neurons |",
                "|---:|---:|---:|---:|",
            ]
            lines += [
                f"| {r['nodes']} | {r['neurons']:,} | {r['faithfulness_nodes']:.3f} | {r['faithfulness_neurons']:.3f} |"
                for r in data["rows"]
            ]
            lines.append("")
        if "top_neurons" in record:
            shown = ", ".join(f"`{n['name']}` {n['score']:+.3f}" for n in record["top_neurons"][:10])
            lines += [f"Top output dimensions by |score|: {shown} (`top_neurons.png`).", ""]
    lines += ["![faithfulness against neurons kept](neurons.png)", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main(HERE, __doc__.splitlines()[0], run_task, rebuild)
