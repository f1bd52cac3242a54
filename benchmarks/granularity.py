"""The cost of finer scores: EAP by edge, by edge and span (positions), by neuron and by MLP hidden unit.

On SmolLM2-135M (the bundled real model) and the catalogue's IOI task (its spans IO, S1, S1+1, S2, END and
rest), one batch of --batch-size examples: seconds (median of --repeats after a warm-up) and peak memory of
``circuits.attribute(..., method="eap")`` at each granularity, with the plain model's forward and backward on the
same batch as the yardstick, and every ratio against it and against edge-level EAP. Peaks are measured in a
child process (``benchmarks/_measure.py``). Prints a table; asserts nothing.

    .venv/bin/python benchmarks/granularity.py [--batch-size 32] [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import child_memory, median_seconds, peak_memory  # noqa: E402

import circuits  # noqa: E402
from circuits import tasks  # noqa: E402

CASES = {  # name: attribute's options
    "edge": {},
    "edge by span": {"positions": True},
    "neuron": {"level": "neuron"},
    "mlp-neuron": {"level": "mlp-neuron"},
}


def runs(batch_size: int) -> dict:
    """Each case as a function of no arguments, with the plain model's forward/backward first."""
    model = circuits.load_model("smollm2-135m", device="cpu")
    task = tasks.get("ioi", model.tokenizer, n=batch_size, seed=0)
    tokens = task.tokenize(model.tokenizer)

    def plain() -> None:
        logits = model.hf(tokens.clean_ids, attention_mask=tokens.attention_mask).logits
        logits[torch.arange(len(tokens)), tokens.positions].sum().backward()
        model.hf.zero_grad(set_to_none=True)

    cases = {"plain forward + backward": plain}
    for name, options in CASES.items():
        cases[name] = lambda options=options: circuits.attribute(
            model, task, "eap", batch_size=batch_size, progress=False, **options
        )
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--memory-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cases = runs(args.batch_size)
    if args.memory_only:
        print(json.dumps({name: peak_memory(fn, torch.device("cpu")) for name, fn in cases.items()}))
        return
    peaks = child_memory(__file__, None, ["--batch-size", str(args.batch_size), "--threads", str(args.threads)])
    seconds = {name: median_seconds(fn, torch.device("cpu"), args.repeats) for name, fn in cases.items()}
    plain, edge = seconds["plain forward + backward"], seconds["edge"]
    print(f"SmolLM2-135M, IOI, {args.batch_size} examples, CPU, {args.threads} threads, EAP")
    print(f"{'case':26} {'seconds':>8} {'x plain':>8} {'x edge':>7} {'peak MiB':>9} {'x plain':>8} {'x edge':>7}")
    for name in cases:
        mib = peaks[name] / 2**20
        print(
            f"{name:26} {seconds[name]:8.2f} {seconds[name] / plain:8.2f} {seconds[name] / edge:7.2f} "
            f"{mib:9.0f} {peaks[name] / peaks['plain forward + backward']:8.2f} {peaks[name] / peaks['edge']:7.2f}"
        )


if __name__ == "__main__":
    main()
