"""EAP with the modified backward passes (``backward="gim"`` / ``"relp"``) against the plain gradient on SmolLM2 IOI.

Runs the three in turn, ``--repeats`` times, in one process on the same batches, and prints each one's best time,
its ratio to the plain gradient's (ratios survive a noisy machine; seconds do not), and the Spearman rank
correlation of its edge scores with the plain gradient's (over the graph's real edges).

    .venv/bin/python benchmarks/backward_rules.py [--n 32] [--batch-size 16] [--repeats 2] [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import torch

import circuits
from circuits import tasks
from circuits.choices import BACKWARDS


def ranks(x: torch.Tensor) -> torch.Tensor:
    return x.argsort().argsort().double()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = circuits.load_model("smollm2-135m")
    task = tasks.get("ioi", tokenizer=model.tokenizer, n=args.n, seed=0)
    seconds = {backward: [] for backward in BACKWARDS}
    scores = {}
    for _ in range(args.repeats):
        for backward in BACKWARDS:
            start = time.perf_counter()
            result = circuits.attribute(
                model, task, "eap", batch_size=args.batch_size, progress=False, backward=backward
            )
            seconds[backward].append(time.perf_counter() - start)
            scores[backward] = result.tensor
    real = model.graph.real
    plain = ranks(scores["gradient"][real])
    for backward in BACKWARDS:
        best = min(seconds[backward])
        rho = float(torch.corrcoef(torch.stack([plain, ranks(scores[backward][real])]))[0, 1])
        print(
            f"{backward:8s} {best:7.2f} s  x{best / min(seconds['gradient']):.2f} of the gradient's  "
            f"Spearman with the gradient's scores {rho:.3f}"
        )


if __name__ == "__main__":
    main()
