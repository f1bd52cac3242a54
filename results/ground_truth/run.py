"""How well each circuit-discovery method recovers known circuits: ROC AUC on every ground-truth model.

    .venv/bin/python results/ground_truth/run.py

For every model of ``circuits.ground_truth.available()`` (tracr-reverse, tracr-proportion, the trained
induction-2l when present), every method (ACDC, exact, EAP, EAP-IG-inputs) and both ablations (zero,
patching): the ROC AUC of the method against the model's known edge set. Attribution methods rank
edges by |score|; ACDC is run over a sweep of thresholds and each resulting circuit is one ROC point,
as the ACDC paper does. Writes results/ground_truth/: roc.csv (one row per model, method and
ablation), acdc_points.csv (the ACDC sweeps), roc.png (the table as bars) and README.md (the table,
the ACDC paper's numbers beside it, and how every number is made). Takes a few minutes on a CPU.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

import circuits  # noqa: E402
from circuits import ground_truth  # noqa: E402
from circuits.evaluate import roc_auc_of_circuits, roc_points  # noqa: E402
from circuits.io import atomic_write_text  # noqa: E402
from circuits.plot import save_figure  # noqa: E402
from circuits.task import REFERENCE_METRICS  # noqa: E402

HERE = Path(__file__).resolve().parent
METHODS = ("acdc", "exact", "eap", "eap-ig-inputs")
ABLATIONS = ("zero", "patching")
THRESHOLDS = (0.0, *(10.0 ** np.arange(-7.0, 1.01, 0.5)))  # 0 and 1e-7 ... 10, half-decade steps
IG_STEPS = 5

# The ACDC paper's edge-level ROC AUCs for its tracr tasks (metric L2, "Loss" rows), as generated in its
# repository: ArthurConmy/Automatic-Circuit-Discovery, experiments/results/auc_tables.tex (commit 6894cd8).
ACDC_PAPER = {
    ("tracr-reverse", "zero"): {"ACDC": 1.000, "HISP": 0.656, "SP": 0.692},
    ("tracr-reverse", "patching"): {"ACDC": 0.200, "HISP": 0.656, "SP": 0.416},
    ("tracr-proportion", "zero"): {"ACDC": 1.000, "HISP": 0.679, "SP": 0.561},
    ("tracr-proportion", "patching"): {"ACDC": 0.600, "HISP": 0.679, "SP": 0.400},
}


def acdc_metric(task: circuits.Task) -> str:
    """ACDC's metric: the task's own when it compares with the clean run (l2, kl), else KL as in the ACDC paper."""
    return task.metric if task.metric in REFERENCE_METRICS else "kl"


def measure(truth: ground_truth.GroundTruth) -> tuple[list[dict], list[pd.DataFrame]]:
    """Every method and ablation on one ground-truth model: rows of roc.csv and the ACDC sweeps."""
    model, task, edges = truth.model, truth.task, truth.edges
    live = truth.scored_edges
    weight_edges = weight_edge_set(truth)
    rows, sweeps = [], []
    for ablation in ABLATIONS:
        for method in METHODS:
            start = time.perf_counter()
            if method == "acdc":
                metric = acdc_metric(task)
                found = [
                    circuits.acdc(model, task, float(t), metric=metric, ablation=ablation, progress=False)
                    for t in THRESHOLDS
                ]
                auc, auc_live = roc_auc_of_circuits(found, edges), roc_auc_of_circuits(found, edges, live)
                auc_weights = roc_auc_of_circuits(found, weight_edges) if weight_edges else float("nan")
                points = roc_points(found, edges)
                points.insert(0, "threshold", THRESHOLDS)
                points.insert(0, "ablation", ablation)
                points.insert(0, "model", truth.name)
                sweeps.append(points)
            else:
                metric = task.metric if isinstance(task.metric, str) else "custom"
                try:
                    scores = circuits.attribute(
                        model, task, method, ablation=ablation, ig_steps=IG_STEPS, progress=False
                    )
                except circuits.CircuitsError as error:  # EAP with a metric at its minimum at the clean run
                    print(f"{truth.name:18s} {method:14s} {ablation:9s} refused: {error}")
                    auc = auc_live = auc_weights = float("nan")
                else:
                    auc, auc_live = circuits.roc_auc(scores, edges), circuits.roc_auc(scores, edges, edges=live)
                    auc_weights = circuits.roc_auc(scores, weight_edges) if weight_edges else float("nan")
            rows.append(
                {
                    "model": truth.name,
                    "method": method,
                    "ablation": ablation,
                    "metric": metric,
                    "roc_auc": round(auc, 4),
                    "roc_auc_live": round(auc_live, 4),
                    "roc_auc_weight_edges": round(auc_weights, 4),
                    "true_edges": len(edges),
                    "edges": len(model.graph.edges),
                    "live_edges": len(live),
                }
            )
            print(
                f"{truth.name:18s} {method:14s} {ablation:9s} ROC AUC {auc:.3f} ({time.perf_counter() - start:.1f} s)"
            )
    return rows, sweeps


def weight_edge_set(truth: ground_truth.GroundTruth) -> set[str]:
    """The tracr models' weight edges before inert ones are dropped (truth.json "weight_edges"); else empty."""
    data = json.loads((ground_truth.directory(truth.name) / "truth.json").read_text(encoding="utf-8"))
    return set(data.get("weight_edges", []))


def plot(table: pd.DataFrame, path: Path) -> None:
    """Grouped bars: one panel per model, methods along x, one bar per ablation."""
    models = list(dict.fromkeys(table.model))
    fig, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models), 3.6), sharey=True, squeeze=False)
    width = 0.38
    colours = {"zero": "#4477aa", "patching": "#ee7733"}
    for ax, name in zip(axes[0], models, strict=True):
        part = table[table.model == name]
        x = np.arange(len(METHODS))
        for k, ablation in enumerate(ABLATIONS):
            values = [float(part[(part.method == m) & (part.ablation == ablation)].roc_auc.iloc[0]) for m in METHODS]
            bars = ax.bar(x + (k - 0.5) * width, values, width, label=f"{ablation} ablation", color=colours[ablation])
            for bar, value in zip(bars, values, strict=True):
                refused = np.isnan(value)  # EAP with a metric at its minimum at the clean run
                text, height = ("refused", 0.01) if refused else (f"{value:.2f}", value + 0.01)
                ax.text(bar.get_x() + bar.get_width() / 2, height, text, ha="center", fontsize=7, rotation=90 * refused)
        ax.axhline(0.5, color="grey", linewidth=0.8, linestyle=":")
        ax.set_xticks(x, ["ACDC", "exact", "EAP", "EAP-IG\ninputs"], fontsize=8)
        ax.set_title(f"{name} ({int(part.true_edges.iloc[0])} of {int(part.edges.iloc[0])} edges)", fontsize=9)
        ax.set_ylim(0, 1.22)
        ax.set_yticks(np.linspace(0, 1, 6))
    axes[0][0].set_ylabel("ROC AUC against the known circuit")
    axes[0][-1].legend(fontsize=7, loc="upper right", ncol=2)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def markdown_table(table: pd.DataFrame, column: str) -> str:
    """Models as rows, method x ablation as columns."""
    header = "| model | " + " | ".join(f"{m} ({a})" for a in ABLATIONS for m in METHODS) + " |"
    lines = [header, "|" + "---|" * (1 + len(METHODS) * len(ABLATIONS))]
    for name in dict.fromkeys(table.model):
        part = table[table.model == name].set_index(["method", "ablation"])[column]
        cells = ["refused" if pd.isna(part[(m, a)]) else f"{part[(m, a)]:.3f}" for a in ABLATIONS for m in METHODS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paper_comparison(table: pd.DataFrame) -> str:
    lines = [
        "| task | ablation | ACDC (paper) | HISP (paper) | SP (paper) | ACDC (here) | exact (here) | EAP (here) "
        "| EAP-IG-inputs (here) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (name, ablation), paper in ACDC_PAPER.items():
        ours = table[(table.model == name) & (table.ablation == ablation)].set_index("method").roc_auc
        if ours.empty:
            continue
        label = "zero" if ablation == "zero" else "patching (paper: random ablation)"
        lines.append(
            f"| {name} | {label} | {paper['ACDC']:.3f} | {paper['HISP']:.3f} | {paper['SP']:.3f} | "
            + " | ".join("refused" if pd.isna(ours[m]) else f"{ours[m]:.3f}" for m in METHODS)
            + " |"
        )
    return "\n".join(lines)


def weight_table(table: pd.DataFrame) -> str:
    """ROC AUC against every weight edge of the tracr models (inert ones included)."""
    with_weights = table[table.roc_auc_weight_edges.notna()].model  # the tracr models (refused rows: NaN)
    part = table[table.model.isin(set(with_weights))]
    return markdown_table(part, "roc_auc_weight_edges") if not part.empty else "(no model with weight edges)"


def induction_note(truths: dict[str, ground_truth.GroundTruth]) -> str:
    """What to read into the trained induction model's row, when it is there."""
    if "induction-2l" not in truths:
        return ""
    return """## The trained induction model

The known circuit of induction-2l (a previous-token head feeding induction heads; see
[induction.md](induction.md)) was established by exact patching under patching ablation: its edges are
those whose exact score exceeds a stated fraction of the total effect. So exact (patching) is 1 there by
construction, and the other patching cells measure how well each method reproduces exact patching's
ranking. Zero ablation asks another question (what breaks when an edge carries nothing at all), so its
ranking need not match that circuit. ACDC uses KL on this task (the ACDC paper's metric for induction).

"""


def readme(table: pd.DataFrame, truths: dict[str, ground_truth.GroundTruth]) -> str:
    models = "\n".join(
        f"- **{name}** ({len(t.task)} examples, metric `{t.task.metric}`, {len(t.edges)} true edges of "
        f"{len(t.model.graph.edges)}; {len(t.scored_edges)} live): {t.description}\n  Truth: {t.how}"
        for name, t in truths.items()
    )
    return f"""# Recovering known circuits: ROC AUC of every method on every ground-truth model

Made by `.venv/bin/python results/ground_truth/run.py` (under a minute on a CPU); the numbers are in
[roc.csv](roc.csv), the ACDC threshold sweeps in [acdc_points.csv](acdc_points.csv), the bars in
[roc.png](roc.png). Every model ships with the package (`circuits.ground_truth.load(name)`), so this runs
without jax; the tracr models are rebuilt by `{ground_truth_command()}` (in an environment with the `tracr` extra).

![ROC AUC by model, method and ablation](roc.png)

## The table

ROC AUC of each method's edge ranking against the known circuit, over every edge of the graph
(0.5 = chance, 1 = every true edge ranked above every false one):

{markdown_table(table, "roc_auc")}

The same over the *live* edges only (edges into or out of nodes that are exactly zero by construction,
such as the heads and MLPs tracr leaves empty and the MLP nodes of the attention-only induction model,
dropped: every method scores them exactly 0, so they are free true negatives that lift every AUC):

{markdown_table(table, "roc_auc_live")}

## Beside the ACDC paper

The ACDC paper (Conmy et al. 2023) reports edge-level ROC AUCs on the two tracr tasks with the L2 metric,
for ACDC, HISP (head importance score for pruning) and SP (subnetwork probing), under zero ablation and
under random ablation (activations patched in from other examples: our `patching`). Its numbers below
are the table its repository generates (`experiments/results/auc_tables.tex` at commit 6894cd8 of
ArthurConmy/Automatic-Circuit-Discovery, "Loss" rows, `roc_edges`); HISP and SP are not implemented here.

{paper_comparison(table)}

What agrees and what does not:

- **ACDC with zero ablation recovers both tracr circuits exactly**, as in the paper (1.000). Our known
  edge sets are read off the compiled weights and equal the circuits the ACDC repository ships for these
  tasks (`get_tracr_reverse_edges`, `get_tracr_proportion_edges`, with embeddings and positions merged
  into our single `input` node); `tests/test_tracr.py` checks both facts and the 0.99 bar for ACDC.
- **Under patching ablation no method can reach 1 on tracr.** Position embeddings, the BOS token and the
  `one` direction are the same in every prompt, so patching an edge that carries only them changes
  nothing: of the 10 reverse edges only the token path (`input->a3.h0<v>`, `a3.h0->logits`) differs
  between a prompt and its patch, and of the 5 proportion edges the two position-only query/key edges
  are invisible. Exact patching, which measures every single-edge effect, sets the ceiling for this
  ablation (0.6 and 0.8: the invisible true edges tie with the false ones). The paper's random-ablation
  ACDC numbers are lower still (0.200, 0.600). Its reverse data are ours (the six permutations of 1 2 3,
  each patched with another); as we read its `get_all_tracr_things`, its proportion data are 50 random
  strings whose letters are encoded as ids 0-3 with no BOS, which in the compiled vocabulary are BOS,
  the pad token, w and x, so that task is not quite ours. We do not know how much of the remaining gap
  its ROC construction explains.
- **EAP is refused on the tracr tasks.** Their metric is the ACDC paper's L2 distance to the clean run,
  which is minimal at the clean run itself, so its gradient there, and with it every EAP score, is exactly
  zero (ties everywhere: ROC AUC 0.500 before `attribute` refused the pair). The same holds for KL.
  EAP-IG-inputs integrates the gradient along a path from the ablated input to the clean one, where it is
  not zero, and recovers the circuits.
- **EAP-IG-inputs on tracr-reverse (zero ablation) ranks float noise.** Eight edges carry scores of 0.03-0.42;
  the rest, two true edges among them, score below 4e-9, where the order is set by rounding: this table's
  0.945 and the 0.996 of its first version come from scores that agree to 3e-8 (checked by running both
  versions of the package on the model).

{induction_note(truths)}## Weight edges and the known circuit

An edge is a *weight edge* when a residual direction its source writes is one its destination reads.
Three weight edges of tracr-reverse change no output on any input and are left out of the known circuit:
`input->a0.h0<q>` and `input->a0.h0<k>` (the length head's selector has predicate TRUE, so every key
gets the same score whatever the query and key hold) and `input->a3.h0<q>` (its only read is the `one`
direction, which makes the head fall back to BOS when no key matches; in reverse a key always matches,
and ablating it moves the outputs by 6e-7). Ablation-based methods cannot find them: ablating them changes
nothing. EAP-IG-inputs scores `input->a3.h0<q>` clearly (on its path up from the zero input the query
matches no key at first, so the BOS fallback matters there) and the two selector edges at float noise
(1e-15), which happens to rank above the exact zeros of the false edges. Against all weight edges (inert
ones counted as true) the table reads:

{weight_table(table)}

## Methods

- **ACDC** (`circuits.acdc`): greedy removal in reverse topological order, with the metric the ACDC paper
  used (L2 on the tracr tasks, KL on tasks whose own metric compares answers), run at {len(THRESHOLDS)}
  thresholds: 0 and 1e-7 to 10 in half-decade steps. Each threshold's circuit is one (false positive
  rate, true positive rate) point; with (0, 0) and (1, 1) added and the points sorted, the area under the
  polyline is the ROC AUC (`circuits.evaluate.roc_auc_of_circuits`): the ACDC paper's way, one point per
  threshold. At threshold 0 ACDC keeps edges whose effect is float noise, which can add a false positive.
- **exact** (`circuits.attribute(..., method="exact")`): one patched forward per edge; the score is the
  task-mean metric with that edge ablated minus the clean one.
- **EAP** and **EAP-IG-inputs** (`method="eap"`, `"eap-ig-inputs"`, {IG_STEPS} steps): first-order estimates
  of the same differences.
- Attribution scores are ranked by |score|, ties counting one half (`circuits.roc_auc`, the Mann-Whitney
  statistic). Every method uses the task's own examples, patches and metric.

## The models

{models}
"""


def ground_truth_command() -> str:
    """The command that rebuilt the tracr models, as their truth.json records it."""
    return ground_truth.load("tracr-reverse").script


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE, help="where to write (default: results/ground_truth)")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)  # the models are tiny: more threads only add synchronisation, which stalls on a busy CPU
    names = ground_truth.available()
    print("ground-truth models:", ", ".join(names))
    truths = {name: ground_truth.load(name) for name in names}
    rows, sweeps = [], []
    for truth in truths.values():
        more_rows, more_sweeps = measure(truth)
        rows += more_rows
        sweeps += more_sweeps
    table = pd.DataFrame(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "roc.csv", table.to_csv(index=False))
    atomic_write_text(args.out / "acdc_points.csv", pd.concat(sweeps).to_csv(index=False))
    plot(table, args.out / "roc.png")
    atomic_write_text(args.out / "README.md", readme(table, truths))
    print(f"wrote {args.out / 'roc.csv'}, acdc_points.csv, roc.png, README.md")


if __name__ == "__main__":
    main()
