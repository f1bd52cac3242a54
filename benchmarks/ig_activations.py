"""eap-ig-activations' cost per gradient point against eap-ig-inputs' and eap-ig-mask's, on one model.

eap-ig-activations takes (2 L + 1) x ig_steps gradient points per batch (every layer group at every step),
the other EAP-IG methods ig_steps: this prints each method's seconds on one batch, divided by its number of
points, and the ratios. The model is a random-weight Llama of SmolLM2-135M's shape (width 576, 9 query and 3
key/value heads, MLP 1536) with --layers layers (30 in SmolLM2), so that a run takes seconds, not an hour;
random prompts whose corrupted copy differs from position --changed-from on. Each method is timed --repeats
times (the median; the first call is a warm-up).

    .venv/bin/python benchmarks/ig_activations.py [--layers 4] [--batch-size 16] [--length 24] [--ig-steps 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import circuits

VOCAB = 4096


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--length", type=int, default=24)
    parser.add_argument("--changed-from", type=int, default=4)
    parser.add_argument("--ig-steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=args.layers,
        num_attention_heads=9,
        num_key_value_heads=3,
    )
    model = circuits.Model.from_hf(AutoModelForCausalLM.from_config(config).eval())
    generator = torch.Generator().manual_seed(1)
    batch, length = args.batch_size, args.length
    clean = torch.randint(1, VOCAB, (batch, length), generator=generator)
    corrupted = clean.clone()
    changed = length - args.changed_from
    corrupted[:, args.changed_from :] = torch.randint(1, VOCAB, (batch, changed), generator=generator)
    answers = torch.randint(1, VOCAB, (2, batch), generator=generator).tolist()
    task = circuits.Task.from_token_ids("random", clean.tolist(), corrupted.tolist(), *answers)
    groups = 2 * model.graph.n_layers + 1
    print(f"{model}\nB = {batch}, T = {length}, ig_steps {args.ig_steps}, {torch.get_num_threads()} threads")
    per_point = {}
    for method in ("eap-ig-inputs", "eap-ig-mask", "eap-ig-activations"):
        points = args.ig_steps * (groups if method == "eap-ig-activations" else 1)

        def run(method=method):
            circuits.attribute(model, task, method, batch_size=batch, ig_steps=args.ig_steps, progress=False)

        run()
        seconds = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            run()
            seconds.append(time.perf_counter() - start)
        per_point[method] = statistics.median(seconds) / points
        print(f"{method:20s} {statistics.median(seconds):8.2f} s  {points:4d} points  {per_point[method]:.3f} s/point")
    for method in ("eap-ig-inputs", "eap-ig-mask"):
        ratio = per_point["eap-ig-activations"] / per_point[method]
        print(f"eap-ig-activations per point / {method} per point: {ratio:.2f}")


if __name__ == "__main__":
    main()
