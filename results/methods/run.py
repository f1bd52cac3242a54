"""The fair table: every discovery method on every catalogue task (SmolLM2) and on the ground-truth models.

    make methods                                            # = .venv/bin/python results/methods/run.py
    .venv/bin/python results/methods/run.py --tasks ioi sva --methods gim relp --force
    OMP_NUM_THREADS=1 .venv/bin/python results/methods/run.py --part catalogue --tasks ioi greater_than induction &
    OMP_NUM_THREADS=1 .venv/bin/python results/methods/run.py --part catalogue --tasks docstring sva capitals ...

Every method sees the same examples (``N`` per task, seed 0), the same ablation (the corrupted prompts'
activations) and the task's own metric, and is scored the same way: its edges ranked as it ranks them, the
faithfulness curve on MIB's grid of circuit sizes (``circuits.faithfulness_curve``: CPR from the signed
selection, CMD from the selection by magnitude), and on the ground-truth models the ROC AUC against the known
edges. Each (model, task, method) is one run whose outcome is a JSON file under results/methods/runs/; a run
whose file exists is skipped unless ``--force``, so an interrupted job resumes. Then results/methods/README.md
(the table, MIB's own ranking beside it), table.csv and methods.png are rebuilt from every file there.
Seconds are the method's own work (scoring, learning, ACDC's search with its candidates), without the curve;
they compare only between runs of the same thread count on an equally loaded machine (the load is recorded).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

import circuits  # noqa: E402
from circuits import ground_truth, tasks  # noqa: E402
from circuits.errors import CircuitsError  # noqa: E402
from circuits.evaluate import roc_auc_of_circuits  # noqa: E402
from circuits.io import atomic_write_text, write_json  # noqa: E402
from circuits.methods.learn import learned_scores  # noqa: E402
from circuits.plot import save_figure  # noqa: E402

HERE = Path(__file__).resolve().parent
RUNS = HERE / "runs"
MODEL = "smollm2-135m"
N = 32
IG_STEPS = 5
ACDC = {"threshold": 0.02, "metric": "logit_diff", "candidates": 300}  # results/run.py's ACDC setting
LEARN_STEPS = 60  # SmolLM2: CPU-sized runs (their papers: 2000-3000 steps on a GPU)
LEARN_BATCH = 8
LEARN_CATALOGUE = {
    "edge-pruning": {"steps": LEARN_STEPS, "batch_size": LEARN_BATCH},
    "ugs": {"steps": LEARN_STEPS, "batch_size": LEARN_BATCH, "samples": 2},  # 2 masks a step, 4 examples each
}
LEARN_TARGET = 0.01  # Edge Pruning's target: this share of the graph's edges (MIB's grid point 1 %)


@dataclass(frozen=True)
class Method:
    """One row of the table: how the method is called."""

    kind: str  # "scores" (attribute), "learn" (learn_circuit), "acdc" (ACDC on EAP-IG's candidates)
    method: str
    backward: str = "gradient"
    label: str = ""
    ground_truth_only: bool = False
    catalogue_tasks: tuple[str, ...] | None = None  # the catalogue tasks it runs on (None: all)
    extra: dict[str, Any] = field(default_factory=dict)


METHODS = {
    "eap": Method("scores", "eap", label="EAP"),
    "eap-ig-inputs": Method("scores", "eap-ig-inputs", label="EAP-IG-inputs"),
    "eap-ig-activations": Method(  # (2L + 1) x steps forward/backwards a batch: 7-14 min a task here
        "scores", "eap-ig-activations", label="EAP-IG-activations", catalogue_tasks=("ioi", "sva")
    ),
    "eap-ig-mask": Method("scores", "eap-ig-mask", label="EAP-IG-mask (AutoCircuit)"),
    "clean-corrupted": Method("scores", "clean-corrupted", label="clean-corrupted"),
    "gim": Method("scores", "eap", backward="gim", label="GIM (EAP)"),
    "gim-ig-inputs": Method("scores", "eap-ig-inputs", backward="gim", label="GIM (EAP-IG-inputs)"),
    "relp": Method("scores", "eap", backward="relp", label="RelP (EAP)"),
    "edge-pruning": Method("learn", "edge-pruning", label="Edge Pruning"),
    "ugs": Method("learn", "ugs", label="UGS"),
    "acdc": Method("acdc", "acdc", label="ACDC"),  # catalogue: on EAP-IG's candidates; ground truth: a sweep
    "exact": Method("scores", "exact", label="exact", ground_truth_only=True),
}

# Ground-truth models: every method under both ablations (the tracr circuits are defined under zero ablation,
# ACDC's paper reports both); the learned methods with the task's metric as the objective and the settings
# tests/test_learn.py measured on tracr (Edge Pruning's tracr-xproportion rates, UGS with 4 masks a step).
ABLATIONS = ("zero", "patching")
LEARN_GROUND_TRUTH = {
    "edge-pruning": {"steps": 720, "lr": 1.0, "lagrangian_lr": 1e-4, "objective": "metric"},
    "ugs": {"steps": 500, "samples": 4, "objective": "metric"},
}


def ground_truth_script():
    """results/ground_truth/run.py as a module: its ACDC threshold sweep and metric rule are the ones used here."""
    spec = importlib.util.spec_from_file_location("ground_truth_run", HERE.parent / "ground_truth" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def outcome_path(model: str, task: str, method: str, ablation: str) -> Path:
    return RUNS / model / task / f"{method}.{ablation}.json"


def curve_outcome(model: circuits.Model, task: circuits.Task, scores: circuits.Scores, ablation: str) -> dict:
    start = time.perf_counter()
    curve = circuits.faithfulness_curve(model, task, scores, ablation=ablation)
    return {
        "cpr": curve.cpr,
        "cmd": curve.cmd,
        "curve": curve.frame[["fraction", "edges", "faithfulness", "faithfulness_absolute"]].to_dict("list"),
        "curve_seconds": time.perf_counter() - start,
    }


def discover(
    name: str, model: circuits.Model, task: circuits.Task, ablation: str, truth: ground_truth.GroundTruth | None
) -> tuple[circuits.Scores | None, list[circuits.Circuit], dict]:
    """Run one method: its scores (None for ACDC), the circuits it gives (ACDC: one per threshold), its settings."""
    spec = METHODS[name]
    if spec.kind == "scores":
        scores = circuits.attribute(
            model, task, spec.method, ablation=ablation, ig_steps=IG_STEPS, backward=spec.backward, progress=False
        )
        return scores, [], {"ig_steps": IG_STEPS, "backward": spec.backward}
    if spec.kind == "learn":
        size = len(truth.edges) if truth else max(1, round(LEARN_TARGET * len(model.graph)))
        settings = (LEARN_GROUND_TRUTH if truth else LEARN_CATALOGUE)[name]
        circuit = circuits.learn_circuit(
            model, task, spec.method, target_edges=size, ablation=ablation, progress=False, **settings
        )
        return learned_scores(circuit, task), [circuit], {**settings, "target_edges": size}
    if truth:  # ACDC over the ground-truth script's threshold sweep: one ROC point per threshold
        script = ground_truth_script()
        metric = script.acdc_metric(task)
        found = [
            circuits.acdc(model, task, float(t), metric=metric, ablation=ablation, progress=False)
            for t in script.THRESHOLDS
        ]
        return None, found, {"metric": metric, "thresholds": [float(t) for t in script.THRESHOLDS]}
    candidates = circuits.attribute(model, task, "eap-ig-inputs", ablation=ablation, ig_steps=IG_STEPS, progress=False)
    found = circuits.acdc(
        model, task, ACDC["threshold"], metric=ACDC["metric"], ablation=ablation, progress=False,
        candidates=candidates.most_helpful(ACDC["candidates"]),
    )  # fmt: skip
    return None, [found], dict(ACDC)


def measure(
    name: str, model: circuits.Model, task: circuits.Task, ablation: str, truth: ground_truth.GroundTruth | None
) -> dict:
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    try:
        scores, found, settings = discover(name, model, task, ablation, truth)
    except CircuitsError as error:  # a combination the method refuses (EAP-like gradients of an l2 metric)
        return {"refused": str(error)}
    outcome: dict[str, Any] = {"seconds": time.perf_counter() - start, "settings": settings}
    outcome["threads"] = torch.get_num_threads()
    if scores is not None:
        outcome.update(curve_outcome(model, task, scores, ablation))
    if found and truth is None:  # ACDC's circuit, or the learned circuit of the target size
        evaluation = circuits.evaluate(model, task, found[-1], ablation=ablation)
        outcome["circuit"] = {"edges": len(found[-1]), "faithfulness": evaluation.faithfulness}
    if truth is not None:
        learned = METHODS[name].kind == "learn"
        # by |score|: the learned methods' scores are >= 0 times the helpful sign (learned_scores)
        outcome["roc_auc"] = (
            roc_auc_of_circuits(found, truth.edges) if scores is None else circuits.roc_auc(scores, truth.edges)
        )
        if learned:
            kept, true = set(found[0].edges), truth.edges
            outcome["precision"] = len(kept & true) / len(kept) if kept else math.nan
            outcome["recall"] = len(kept & true) / len(true)
    outcome["load"] = {"before": load_before, "after": os.getloadavg()[0], "cpus": os.cpu_count()}
    return outcome


def finished(model_name: str, task_name: str, name: str, ablation: str, force: bool) -> bool:
    """Has this run an outcome file that stands (no ``--force``)? Says so when it has."""
    done = outcome_path(model_name, task_name, name, ablation).exists() and not force
    if done:
        print(f"{model_name} / {task_name} / {name} ({ablation}): done before, skipped (--force reruns it)")
    return done


def run(model_name: str, task_name: str, name: str, ablation: str, force: bool, get) -> None:
    path = outcome_path(model_name, task_name, name, ablation)
    if finished(model_name, task_name, name, ablation, force):
        return
    model, task, truth = get()
    print(f"{model_name} / {task_name} / {name} ({ablation})", flush=True)
    outcome = measure(name, model, task, ablation, truth)
    record = {"model": model_name, "task": task_name, "method": name, "ablation": ablation, "n": len(task), **outcome}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, record)  # strict JSON: a NaN (faithfulness 0/0) is written as null
    shown = {k: v for k, v in record.items() if k in ("cpr", "cmd", "roc_auc", "seconds", "refused", "circuit")}
    print(f"  {shown}", flush=True)


def run_isolated(task_name: str, name: str, force: bool) -> None:
    """A mask-learning run on SmolLM2 in a process of its own: one the kernel kills for memory (Edge Pruning on
    docstring's long prompts needs more than 23 GB) is recorded as failed, and the other runs go on."""
    path = outcome_path(MODEL, task_name, name, "patching")
    if finished(MODEL, task_name, name, "patching", force):
        return
    argv = [sys.executable, __file__, "--part", "catalogue", "--tasks", task_name, "--methods", name, "--child"]
    status = subprocess.run([*argv, *(["--force"] if force else [])], check=False).returncode
    if status != 0 and not path.exists():
        cause = f"killed by signal {-status} (SIGKILL: the kernel, out of memory)" if status < 0 else f"status {status}"
        record = {"model": MODEL, "task": task_name, "method": name, "ablation": "patching", "failed": cause}
        write_json(path, record)
        print(f"  failed: {cause}", flush=True)


# --- the table, the figure, the README --------------------------------------------------------------------------


def table() -> pd.DataFrame:
    rows = []
    for path in sorted(RUNS.glob("*/*/*.json")):
        record = json.loads(path.read_text())
        rows.append(
            {
                "model": record["model"],
                "task": record["task"],
                "method": record["method"],
                "ablation": record["ablation"],
                "CPR": record.get("cpr"),
                "CMD": record.get("cmd"),
                "ROC AUC": record.get("roc_auc"),
                "circuit edges": (record.get("circuit") or {}).get("edges"),
                "circuit faithfulness": (record.get("circuit") or {}).get("faithfulness"),
                "precision": record.get("precision"),
                "recall": record.get("recall"),
                "seconds": record.get("seconds"),
                "threads": record.get("threads"),
                "load": (record.get("load") or {}).get("after"),
                "refused": record.get("refused") or record.get("failed"),
            }
        )
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    order = {name: i for i, name in enumerate(METHODS)}
    frame["_order"] = frame.method.map(order)
    return frame.sort_values(["model", "task", "ablation", "_order"]).drop(columns="_order").reset_index(drop=True)


def plot(frame: pd.DataFrame, path: Path) -> None:
    """Methods x tasks: CPR and CMD on SmolLM2, ROC AUC on the ground-truth models (both ablations)."""
    catalogue = frame[frame.model == MODEL]
    truth = frame[frame.model != MODEL]
    panels = [(catalogue, "CPR", "CPR ↑ (SmolLM2)", "viridis"), (catalogue, "CMD", "CMD ↓ (SmolLM2)", "viridis_r")]
    panels.append(
        (truth.assign(task=truth.task + " · " + truth.ablation), "ROC AUC", "ROC AUC ↑ (ground truth)", "viridis")
    )
    fig, axes = plt.subplots(1, 3, figsize=(19, 6.5), constrained_layout=True)
    for ax, (part, column, title, cmap) in zip(axes, panels, strict=True):
        methods = [m for m in METHODS if part[part.method == m][column].notna().any()]
        grid = part.pivot_table(index="method", columns="task", values=column, aggfunc="first").reindex(methods)
        values = grid.to_numpy(dtype=float)
        image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, aspect="auto")
        ax.set_xticks(range(grid.shape[1]), grid.columns, rotation=40, ha="right")
        ax.set_yticks(range(grid.shape[0]), [METHODS[m].label for m in grid.index])
        for (i, j), value in np.ndenumerate(values):
            red, green, blue, _ = image.cmap(image.norm(value)) if not math.isnan(value) else (1, 1, 1, 1)
            light = 0.3 * red + 0.6 * green + 0.1 * blue > 0.5  # dark text on the light cells
            ax.text(j, i, "—" if math.isnan(value) else f"{value:.2f}", ha="center", va="center", fontsize=8,
                    color="gray" if math.isnan(value) else "black" if light else "white")  # fmt: skip
        ax.set_title(title)
    save_figure(fig, path)
    plt.close(fig)


def cell(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.{digits}f}"


def readme(frame: pd.DataFrame) -> str:
    mib = (HERE / "mib.md").read_text() if (HERE / "mib.md").exists() else ""
    reading = (HERE / "reading.md").read_text() if (HERE / "reading.md").exists() else ""
    catalogue = frame[frame.model == MODEL]
    lines = [
        "# Every method on one engine: the fair table",
        "",
        "`make methods` (= `.venv/bin/python results/methods/run.py`) made every number here; `--tasks`,",
        "`--methods`, `--part` pick some, `--force` reruns. Each run's outcome is a JSON file under",
        "[runs/](runs/) (the curve's points, the settings, seconds, threads and load).",
        "Figure: [methods.png](methods.png).",
        "",
        f"**Catalogue tasks on {MODEL}** (fp32, CPU): {N} examples per task (seed 0), the same for every method;",
        "patching ablation (the corrupted prompts' activations); the task's metric (logit difference).",
        "CPR (↑) and CMD (↓) as MIB defines them: the area under the faithfulness curve over MIB's grid of circuit",
        "sizes (0.1 % ... 100 % of the edges), CPR from the edges selected signed (those that carry the task),",
        "CMD from |1 - faithfulness| with the edges selected by magnitude. Every circuit is pruned of dangling",
        f"edges. Gradient methods: EAP-IG with {IG_STEPS} steps; GIM and RelP are EAP with the modified backward",
        '(`backward="gim"`, `"relp"`), GIM also with EAP-IG-inputs. EAP-IG-activations costs (2L + 1) x steps',
        "forward/backwards a batch (305 on SmolLM2): it runs on IOI and sva only.",
        f"Edge Pruning and UGS: {LEARN_STEPS} steps of {LEARN_BATCH} examples",
        "(UGS: 2 masks a step, 4 examples each; their papers run 2000-3000 steps on a GPU), Edge Pruning's target",
        f"{LEARN_TARGET:.0%} of the edges; their curve ranks edges by the learned numbers (`learned_scores`; MIB",
        "ranks UGS's by sigmoid(alpha): the same order), and their circuit of the target size is evaluated too. ACDC",
        f"(threshold {ACDC['threshold']} on the {ACDC['metric']}, EAP-IG's {ACDC['candidates']} most helpful edges as",
        "candidates, the candidates' scoring included in its seconds) gives one circuit: its size and faithfulness",
        "instead of a curve. `exact` (one patched forward per edge) does not fit SmolLM2 on a CPU; it runs on the",
        "ground-truth models.",
        "",
    ]
    if not catalogue.empty:
        tasks_done = list(dict.fromkeys(catalogue.task))
        methods = [m for m in METHODS if m in set(catalogue.method)]
        curves = [m for m in methods if catalogue[catalogue.method == m].CPR.notna().any()]  # ACDC: no curve
        for metric, arrow in (("CPR", "↑"), ("CMD", "↓")):
            lines += [f"### {metric} {arrow}", "", "| method | " + " | ".join(tasks_done) + " | mean |",
                      "|---|" + "---|" * (len(tasks_done) + 1)]  # fmt: skip
            for method in curves:
                part = catalogue[catalogue.method == method].set_index("task")
                values = [part[metric].get(t) for t in tasks_done]
                numbers = [v for v in values if v is not None and not pd.isna(v)]
                mean = sum(numbers) / len(numbers) if len(numbers) == len(tasks_done) else None
                lines.append(
                    f"| {METHODS[method].label} | " + " | ".join(cell(v) for v in values) + f" | {cell(mean)} |"
                )
            lines.append("")
        lines += ["### The circuits of ACDC and of the learned masks' target size, and seconds", "",
                  "| method | " + " | ".join(tasks_done) + " |", "|---|" + "---|" * len(tasks_done)]  # fmt: skip
        for method in [m for m in methods if METHODS[m].kind in ("acdc", "learn")]:
            part = catalogue[catalogue.method == method].set_index("task")
            pairs = [f"{cell(part['circuit edges'].get(t), 0)} / {cell(part['circuit faithfulness'].get(t))}"
                     for t in tasks_done]  # fmt: skip
            lines.append(f"| {METHODS[method].label}: edges / faithfulness | " + " | ".join(pairs) + " |")
        for method in methods:
            part = catalogue[catalogue.method == method].set_index("task")
            lines.append(
                f"| seconds: {METHODS[method].label} | "
                + " | ".join(f"{cell(part['seconds'].get(t), 0)}" for t in tasks_done)
                + " |"
            )
        threads = sorted({int(t) for t in catalogue.threads.dropna()})
        loads = catalogue.load.dropna()
        lines += ["", f"Threads: {', '.join(map(str, threads))}; 1-minute load when runs ended: "
                  f"{loads.min():.1f}-{loads.max():.1f} on {os.cpu_count()} CPUs.", ""]  # fmt: skip
    truth = frame[frame.model != MODEL]
    if not truth.empty:
        lines += [
            "**Ground-truth models** (tracr-reverse, tracr-proportion: the ACDC paper's compiled tracr programs;",
            "induction-2l: a trained 2-layer attention-only induction model with its known circuit; see",
            "[results/ground_truth](../ground_truth/README.md)). ROC AUC of each method's edge ranking against the",
            "true edges (gradient methods by |score|, the learned ones by their learned numbers; ACDC: one ROC point",
            "per threshold of results/ground_truth's sweep). Learned methods also give precision / recall of their",
            "circuit of the true size (the target they learn toward: Edge Pruning 720 steps, lr 1, multipliers' lr",
            "1e-4; UGS 500 steps, 4 masks a step; the task's metric as the objective, as tests/test_learn.py",
            "measured them). EAP, GIM and RelP take their gradients at the clean run, where the tracr",
            "tasks' l2 metric is at its minimum: refused (—).",
            "",
        ]
        for ablation in ABLATIONS:
            part = truth[truth.ablation == ablation]
            models = list(dict.fromkeys(part.model))
            methods = [m for m in METHODS if m in set(part.method)]
            lines += [f"ROC AUC, {ablation} ablation:", "", "| method | " + " | ".join(models) + " |",
                      "|---|" + "---|" * len(models)]  # fmt: skip
            for method in methods:
                rows = part[part.method == method].set_index("model")
                values = []
                for m in models:
                    auc = rows["ROC AUC"].get(m)
                    text = cell(auc)
                    if METHODS[method].kind == "learn" and m in rows.index:
                        text += f" (P {cell(rows['precision'].get(m), 2)}, R {cell(rows['recall'].get(m), 2)})"
                    values.append(text)
                lines.append(f"| {METHODS[method].label} | " + " | ".join(values) + " |")
            lines.append("")
    return "\n".join([*lines, mib, reading]).rstrip() + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["all", "catalogue", "ground-truth", "table"], default="all")
    parser.add_argument("--tasks", nargs="*", default=list(tasks.available()), choices=list(tasks.available()))
    parser.add_argument("--models", nargs="*", default=list(ground_truth.available()), choices=ground_truth.available())
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--force", action="store_true", help="rerun finished runs")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # one isolated run, no table
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.part in ("all", "ground-truth"):
        for name in args.models:
            loaded: dict[str, Any] = {}

            def get(name=name, loaded=loaded):
                if not loaded:
                    truth = ground_truth.load(name)
                    loaded["value"] = (truth.model, truth.task, truth)
                return loaded["value"]

            for ablation in ABLATIONS:
                for method in args.methods:
                    run(name, name, method, ablation, args.force, get)
    if args.part in ("all", "catalogue"):
        model_cache: dict[str, Any] = {}
        for task_name in args.tasks:

            def get(task_name=task_name):
                if "model" not in model_cache:
                    model_cache["model"] = circuits.load_model(MODEL, device="cpu")
                model = model_cache["model"]
                return model, tasks.get(task_name, model.tokenizer, n=N, seed=0), None

            for method in args.methods:
                spec = METHODS[method]
                if spec.ground_truth_only or (spec.catalogue_tasks and task_name not in spec.catalogue_tasks):
                    continue
                if METHODS[method].kind == "learn" and not args.child:
                    run_isolated(task_name, method, args.force)
                else:
                    run(MODEL, task_name, method, "patching", args.force, get)
    if args.child:
        return
    frame = table()
    if frame.empty:
        sys.exit("no runs yet")
    atomic_write_text(HERE / "table.csv", frame.to_csv(index=False))
    plot(frame, HERE / "methods.png")
    atomic_write_text(HERE / "README.md", readme(frame))
    print(frame.drop(columns="refused").to_string(index=False))


if __name__ == "__main__":
    main()
