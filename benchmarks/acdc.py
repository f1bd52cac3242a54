"""ACDC: forward-pass equivalents and seconds with and without prefix reuse, and ACDC on SmolLM2 candidates.

1. A 4-layer tiny Llama-shaped model on a token-id task: the same ACDC run with prefix reuse and
   with a whole forward per step (the circuits are checked to be identical).
2. SmolLM2 on IOI with the top-N EAP edges as candidates: seconds and circuit size.

    .venv/bin/python benchmarks/acdc.py [--candidates 500] [--n 32] [--threshold 0.02]
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import circuits
from circuits import tasks


def tiny_four_layer_model() -> circuits.Model:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=61,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        initializer_range=0.3,
    )
    return circuits.Model.from_hf(AutoModelForCausalLM.from_config(config), name="tiny-llama-4-layers")


def prefix_reuse(threshold: float) -> None:
    model = tiny_four_layer_model()
    task = tasks.get("induction", None, n=32, seed=0)
    runs = {}
    for reuse in (True, False):
        start = time.perf_counter()
        circuit = circuits.acdc(model, task, threshold=threshold, progress=False, reuse_prefix=reuse)
        runs[reuse] = (time.perf_counter() - start, circuit)
    (with_s, with_c), (without_s, without_c) = runs[True], runs[False]
    assert torch.equal(with_c.mask, without_c.mask), "prefix reuse changed the circuit"
    used, naive = with_c.meta["forward_equivalents"], with_c.meta["forward_equivalents_without_prefix_reuse"]
    print(f"{model}, {task}, threshold {threshold}")
    print(f"  circuit: {len(with_c)} of {len(model.graph)} edges, {with_c.meta['steps']} steps")
    print(f"  forward-pass equivalents: {used:.1f} with prefix reuse, {naive:.1f} without ({naive / used:.2f}x fewer)")
    print(f"  seconds: {with_s:.2f} with prefix reuse, {without_s:.2f} without ({without_s / with_s:.2f}x faster)")


def smollm2(n: int, candidates: int, threshold: float) -> None:
    model = circuits.load_model("smollm2-135m", device="cpu")
    task = tasks.get("ioi", model.tokenizer, n=n, seed=0)
    start = time.perf_counter()
    scores = circuits.attribute(model, task, "eap", progress=False)
    eap_seconds = time.perf_counter() - start
    start = time.perf_counter()
    circuit = circuits.acdc(model, task, threshold=threshold, candidates=scores.top_edges(candidates), progress=True)
    seconds = time.perf_counter() - start
    meta = circuit.meta
    print(f"\n{model}, {task}, top-{candidates} EAP candidates ({eap_seconds:.1f} s), threshold {threshold} (KL)")
    print(f"  ACDC: {seconds:.1f} s, {meta['steps']} steps, circuit {len(circuit)} edges / {len(circuit.nodes)} nodes")
    print(
        f"  forward-pass equivalents: {meta['forward_equivalents']:.1f} "
        f"(without prefix reuse {meta['forward_equivalents_without_prefix_reuse']:.0f})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", type=int, default=500)
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--threshold", type=float, default=0.02)
    parser.add_argument("--tiny-threshold", type=float, default=0.01)
    args = parser.parse_args()
    prefix_reuse(args.tiny_threshold)
    smollm2(args.n, args.candidates, args.threshold)


if __name__ == "__main__":
    main()
