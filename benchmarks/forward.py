"""The engine's forward against the plain HF forward, measured in the same process on the same batch.

SmolLM2, 32 prompts of about 16 tokens. Prints median seconds, the ratio
ours / plain, and the peak memory of each (CUDA: allocator peak; CPU: the
peak resident set during the call, above the level before it).

    .venv/bin/python benchmarks/forward.py [--repeats 7] [--device cpu]

The ratio column compares with the first row (the plain HF forward with all
logits); compare the "last logits" rows with each other for the like-for-like
figure, since circuit metrics only need the prediction positions.
"""

from __future__ import annotations

import argparse
import json

import torch
from _measure import child_memory, median_seconds, peak_memory

import circuits

PROMPTS = [
    "When {a} and {b} went to the {place}, {c} gave a {thing} to the other one",
    "After {a} and {b} met at the {place} yesterday, {c} handed the {thing} to",
]
NAMES = ["John", "Mary", "Alice", "Bob", "Kate", "Peter", "Anna", "David"]
PLACES = ["store", "park", "school", "office"]
THINGS = ["drink", "book", "ring", "ball"]


def prompts(n: int) -> list[str]:
    out = []
    for i in range(n):
        template = PROMPTS[i % len(PROMPTS)]
        out.append(
            template.format(
                a=NAMES[i % 8], b=NAMES[(i + 3) % 8], c=NAMES[(i + 5) % 8], place=PLACES[i % 4], thing=THINGS[i % 4]
            )
        )
    return out


def setup(device_name: str | None):
    model = circuits.load_model("smollm2-135m", device=device_name)
    device = model.device
    encoded = model.tokenizer(prompts(32), return_tensors="pt", padding=True, padding_side="right")
    ids, mask = encoded.input_ids.to(device), encoded.attention_mask.to(device)
    last = mask.sum(1) - 1
    ones = torch.ones(model.graph.n_src, model.graph.n_dst, device=device)
    half = (torch.rand(ones.shape, generator=torch.Generator().manual_seed(0)) < 0.5).float().to(device)
    patch = circuits.engine.source_outputs(model, ids, mask)  # stands in for a corrupted run: same cost
    real = model.graph.real.nonzero()
    circuit = torch.zeros_like(ones)  # a 200-edge circuit: everything else patched
    circuit[tuple(real[torch.randperm(len(real), generator=torch.Generator().manual_seed(0))[:200]].T)] = 1
    one_edge = ones.clone()
    one_edge[model.graph.index("a3.h1->a20.h2<k>")] = 0
    cases = {
        "plain HF forward (all logits)": lambda: model.hf(ids, attention_mask=mask).logits,
        "plain HF forward (last logits)": lambda: model.hf(ids, attention_mask=mask, logits_to_keep=1).logits,
        "engine, no mask (all logits)": lambda: circuits.patched_forward(model, ids, mask).logits,
        "engine, no mask (last logits)": lambda: (
            circuits.patched_forward(model, ids, mask, logit_positions=last).logits
        ),
        "engine, mask of ones": lambda: circuits.patched_forward(model, ids, mask, ones, logit_positions=last).logits,
        "engine, one edge patched": lambda: (
            circuits.patched_forward(model, ids, mask, one_edge, patch, logit_positions=last).logits
        ),
        "engine, 200-edge circuit, patching": lambda: (
            circuits.patched_forward(model, ids, mask, circuit, patch, logit_positions=last).logits
        ),
        "engine, 50% random mask, patching": lambda: (
            circuits.patched_forward(model, ids, mask, half, patch, logit_positions=last).logits
        ),
    }
    return model, ids, mask, cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default=None)
    parser.add_argument("--memory-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    model, ids, mask, cases = setup(args.device)
    device = model.device
    if args.memory_only:
        with torch.no_grad():
            for fn in cases.values():
                fn()  # warm-up: one-time allocations are not the case's own
            print(json.dumps({name: peak_memory(fn, device) for name, fn in cases.items()}))
        return
    print(f"{model}\nbatch {tuple(ids.shape)}, {int(mask.sum())} real tokens, torch threads {torch.get_num_threads()}")
    with torch.no_grad():
        seconds = {name: median_seconds(fn, device, args.repeats) for name, fn in cases.items()}
        memory = (
            {name: peak_memory(fn, device) for name, fn in cases.items()}
            if device.type == "cuda"
            else child_memory(__file__, args.device)
        )
    results = {name: (seconds[name], memory[name]) for name in cases}

    base_seconds, base_memory = results["plain HF forward (all logits)"]
    print(f"\n{'':34s} {'median s':>9s} {'ratio':>6s} {'peak MiB':>9s} {'ratio':>6s}")
    for name, (seconds, peak) in results.items():
        print(
            f"{name:34s} {seconds:9.3f} {seconds / base_seconds:6.2f} {peak / 2**20:9.1f} "
            f"{peak / max(base_memory, 1):6.2f}"
        )


if __name__ == "__main__":
    main()
