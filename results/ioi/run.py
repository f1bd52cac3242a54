"""The IOI circuit of the bundled SmolLM2: EAP-IG scores, the 200-edge circuit, its faithfulness and figure,
and the faithfulness curves of EAP vs EAP-IG (CPR/CMD on MIB's grid).

    .venv/bin/python results/ioi/run.py [--n 64]

Writes results/ioi/: circuit.json, circuit.png, circuit.pdf, faithfulness.png, summary.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import circuits
import tasks
from circuits.io import atomic_write_text

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--edges", type=int, default=200)
    args = parser.parse_args()
    model = circuits.load_model("smollm2-135m", device="cpu")
    task = tasks.get("ioi", model.tokenizer, n=args.n, seed=0)
    summary = {"model": model.name, "task": task.name, "n": len(task), "edges": args.edges, "seconds": {}}
    curves = []
    for method in ("eap", "eap-ig-inputs"):
        start = time.perf_counter()
        scores = circuits.attribute(model, task, method, ig_steps=5)
        summary["seconds"][f"{method} attribution"] = time.perf_counter() - start
        start = time.perf_counter()
        curve = circuits.faithfulness_curve(model, task, scores)
        summary["seconds"][f"{method} curve"] = time.perf_counter() - start
        curves.append(curve)
        summary[method] = {"cpr": curve.cpr, "cmd": curve.cmd, "curve": curve.frame.to_dict(orient="list")}
        if method == "eap-ig-inputs":
            circuit = scores.top_n(args.edges)
            evaluation = circuits.evaluate(model, task, circuit)
            circuit.save(HERE / "circuit.json")
            circuit.plot(HERE / "circuit.png", title=f"SmolLM2-135M IOI, EAP-IG, top {args.edges} edges")
            circuit.plot(HERE / "circuit.pdf", title=f"SmolLM2-135M IOI, EAP-IG, top {args.edges} edges")
            summary["circuit"] = {
                **circuit.meta["selection"],
                "faithfulness": evaluation.faithfulness,
                "metric_full": evaluation.full,
                "metric_circuit": evaluation.circuit,
                "metric_empty": evaluation.empty,
                "accuracy": evaluation.accuracy,
            }
    curves[0].plot(path=HERE / "faithfulness.png", others=curves[1:])
    atomic_write_text(HERE / "summary.json", json.dumps(summary, indent=1))
    print(json.dumps({k: v for k, v in summary.items() if k not in ("eap", "eap-ig-inputs")}, indent=1))
    for method in ("eap", "eap-ig-inputs"):
        print(f"{method}: CPR {summary[method]['cpr']:.3f}, CMD {summary[method]['cmd']:.3f}")


if __name__ == "__main__":
    main()
