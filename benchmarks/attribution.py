"""Attribution methods on SmolLM2 IOI against the plain-model floor measured in the same run.

For each method: seconds, the floor on the same batches (EAP and clean-corrupted: 2 no-grad
forwards + 1 or 2 forward/backwards of the HF model with activation gradients; EAP-IG:
2 forwards + ig_steps forward/backwards; eap-ig-activations: 2 forwards + (2 L + 1) x ig_steps
forward/backwards), the ratio ours / floor, and peak memory against the plain forward/backward's
(CPU peaks from a child process, see _measure.py). eap-ig-activations runs only when named in
--methods: on SmolLM2 (L = 30) it takes 61 x ig_steps forward/backwards per batch.

    .venv/bin/python benchmarks/attribution.py [--n 64] [--batch-size 32] [--ig-steps 5] [--methods eap ...]
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial

import torch
from _measure import child_memory, peak_memory

import circuits
from circuits import tasks
from circuits.task import metric_values

GRADIENT_POINTS = {"eap": 1, "clean-corrupted": 2}  # forward/backwards per batch; IG methods use ig_steps
DEFAULT_METHODS = ("eap", "eap-ig-inputs", "eap-ig-mask", "clean-corrupted")
GRADIENT_METHODS = [name for name in circuits.choices.METHODS if name != "exact"]


def gradient_points(name: str, ig_steps: int, n_layers: int) -> int:
    """The forward/backwards per batch of the plain model that a method's gradient points amount to."""
    if name == "eap-ig-activations":  # every layer group (the input, each layer's heads, each layer's MLP)
        return (2 * n_layers + 1) * ig_steps
    return GRADIENT_POINTS.get(name, ig_steps)


def plain_floor(model, tokenized, batch_size: int, backward_passes: int) -> None:
    """The plain HF model's work: clean and corrupted forwards, then forward/backwards with input gradients."""
    hf = model.hf
    for batch in tokenized.batches(batch_size):
        rows = torch.arange(len(batch))
        with torch.no_grad():
            hf(batch.clean_ids, attention_mask=batch.attention_mask)
            hf(batch.corrupted_ids, attention_mask=batch.attention_mask)
        for _ in range(backward_passes):
            embeddings = hf.get_input_embeddings()(batch.clean_ids).detach().requires_grad_(True)
            logits = hf(inputs_embeds=embeddings, attention_mask=batch.attention_mask).logits[rows, batch.positions]
            torch.autograd.grad(metric_values("logit_diff", logits, batch).sum(), embeddings)


def setup(args):
    model = circuits.load_model("smollm2-135m", device="cpu")
    task = tasks.get("ioi", model.tokenizer, n=args.n, seed=0)
    tokenized = task.tokenize(model.tokenizer)
    methods = {
        name: partial(
            circuits.attribute, model, task, name, batch_size=args.batch_size, ig_steps=args.ig_steps, progress=False
        )
        for name in dict.fromkeys(("eap", *args.methods))  # eap: the warm-up, and the plain backward's peak
    }
    floors = {}
    for name in methods:
        passes = gradient_points(name, args.ig_steps, model.graph.n_layers)
        floors[name] = partial(plain_floor, model, tokenized, args.batch_size, passes)
    return model, task, methods, floors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--ig-steps", type=int, default=5)
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=GRADIENT_METHODS)
    parser.add_argument("--memory-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    model, task, methods, floors = setup(args)
    cases = {**{f"ours {k}": v for k, v in methods.items()}, **{f"floor {k}": v for k, v in floors.items()}}
    cases["ours eap"](), cases["floor eap"]()  # warm-up: first calls pay one-time costs
    if args.memory_only:
        print(json.dumps({name: peak_memory(fn, model.device) for name, fn in cases.items()}))
        return

    print(f"{model}\n{task}, batch size {args.batch_size}, ig_steps {args.ig_steps}, {torch.get_num_threads()} threads")
    seconds = {}
    for name, fn in cases.items():
        start = time.perf_counter()
        fn()
        seconds[name] = time.perf_counter() - start
    arguments = ["--n", str(args.n), "--batch-size", str(args.batch_size), "--ig-steps", str(args.ig_steps)]
    arguments += ["--methods", *args.methods]
    memory = child_memory(__file__, None, arguments) if model.device.type == "cpu" else {}
    backward_peak = memory.get("floor eap", 0)
    print(f"\n{'method':20s} {'ours s':>8s} {'floor s':>8s} {'ratio':>6s} {'peak MiB':>9s} {'vs plain bwd':>12s}")
    for name in methods:
        ours, floor = seconds[f"ours {name}"], seconds[f"floor {name}"]
        peak = memory.get(f"ours {name}", 0)
        print(
            f"{name:20s} {ours:8.2f} {floor:8.2f} {ours / floor:6.2f} {peak / 2**20:9.0f} "
            f"{peak / max(backward_peak, 1):12.2f}"
        )
    print(f"plain forward/backward peak: {backward_peak / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
