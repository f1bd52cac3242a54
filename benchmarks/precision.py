"""Scores of a bfloat16 (or float16) model against the float32 model's, on SmolLM2 IOI.

For each method: the Pearson correlation of the two score tensors over every edge, the largest
relative difference (max |low - fp32| / max |fp32|, and the same over the top-200 edges by |fp32|
score, each edge against its own score), and the overlap of the top-200 edge sets, by |score| and by
the signed ``most_helpful`` ordering (the edges whose ablation hurts the task most; unpruned sets,
overlap = |A & B| / 200). Scores are fp32 tensors in both cases; only the model computes in bf16.

    .venv/bin/python benchmarks/precision.py [--n 64] [--batch-size 32] [--ig-steps 5] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import time

import torch

import circuits
from circuits import tasks
from circuits.circuit import Scores, helpful_sign, top_n_mask

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def top_set(scores: Scores, n: int, signed: bool) -> torch.Tensor:
    if signed:
        sign = helpful_sign(scores.meta["higher_is_better"], scores.meta.get("metric"))
        scores = Scores(scores.graph, scores.tensor * sign, scores.level, scores.meta)
    return top_n_mask(scores, n, absolute=not signed)


def compare(reference: Scores, low: Scores, top: int) -> dict[str, float]:
    real = reference.graph.real
    a, b = reference.tensor[real].double(), low.tensor[real].double()
    pearson = float(torch.corrcoef(torch.stack([a, b]))[0, 1])
    largest = float((a - b).abs().max() / a.abs().max())
    best = a.abs().argsort(descending=True)[:top]
    top_relative = float(((a[best] - b[best]).abs() / a[best].abs()).max())
    overlap = {
        name: int((top_set(reference, top, signed) & top_set(low, top, signed)).sum()) / top
        for name, signed in (("abs", False), ("signed", True))
    }
    return {"pearson": pearson, "max_rel": largest, "top_rel": top_relative, **overlap}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--ig-steps", type=int, default=5)
    parser.add_argument("--top", type=int, default=200)
    parser.add_argument("--dtype", default="bfloat16", choices=DTYPES)
    parser.add_argument("--methods", nargs="+", default=["eap", "eap-ig-inputs"])
    args = parser.parse_args()
    torch.manual_seed(0)
    models = {
        "float32": circuits.load_model("smollm2-135m", device="cpu"),
        args.dtype: circuits.load_model("smollm2-135m", device="cpu", dtype=DTYPES[args.dtype]),
    }
    task = tasks.get("ioi", models["float32"].tokenizer, n=args.n, seed=0)
    graph = models["float32"].graph
    print(f"SmolLM2-135M, IOI n={args.n}, batch {args.batch_size}, {len(graph):,} edges; {args.dtype} against float32")
    print(f"{'method':<15} {'pearson':>8} {'max rel diff':>13} {f'top-{args.top} rel':>12} "
          f"{f'top-{args.top} |s|':>11} {f'top-{args.top} signed':>15} {'seconds fp32/low':>17}")  # fmt: skip
    for method in args.methods:
        scores, seconds = {}, {}
        for name, model in models.items():
            start = time.perf_counter()
            scores[name] = circuits.attribute(
                model, task, method, batch_size=args.batch_size, ig_steps=args.ig_steps, progress=False
            )
            seconds[name] = time.perf_counter() - start
            assert scores[name].tensor.dtype == torch.float32
        r = compare(scores["float32"], scores[args.dtype], args.top)
        print(
            f"{method:<15} {r['pearson']:>8.5f} {r['max_rel']:>13.4f} {r['top_rel']:>12.4f} {r['abs']:>11.3f} "
            f"{r['signed']:>15.3f} {seconds['float32']:>8.1f}/{seconds[args.dtype]:.1f}"
        )


if __name__ == "__main__":
    main()
