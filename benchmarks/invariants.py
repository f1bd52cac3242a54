"""Max logit deviations of the engine's invariants, per architecture (fp32, real positions only).

1. mask of ones vs the unmodified HF model (plain path, and the per-destination path
   that a mask requiring grad takes);
2. mask of zeros with patching vs the HF model on the corrupted prompts;
3. single-edge patches vs the hook-based oracle of tests/oracle.py (max over edges into
   q, k, v, MLP and logits destinations).

    .venv/bin/python benchmarks/invariants.py [--no-smollm2]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import circuits
from circuits.testing import ARCHITECTURES, tiny_hf, tiny_pair

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from oracle import Oracle  # noqa: E402  (the test suite's independent oracle)

TINY_EDGES = ["input->a0.h1<q>", "a0.h2->a1.h3<q>", "a0.h1->a1.h0<k>", "m0->a1.h0<v>", "a0.h0->m1", "a2.h1->logits"]
SMOLLM2_EDGES = ["a3.h1->a20.h2<k>", "a10.h8->a14.h4<q>", "m2->a7.h0<v>", "a25.h5->m27", "m29->logits"]


def deviations(model: circuits.Model, clean, corrupted, mask, edges) -> tuple[float, float, float]:
    real = mask.bool()
    graph = model.graph
    oracle = Oracle(model.hf)
    ones = torch.ones(graph.n_src, graph.n_dst)
    with torch.no_grad():
        patch = circuits.engine.patching_values(model, mask, corrupted, mask)
        full = circuits.patched_forward(model, clean, mask, ones).logits
        empty = circuits.patched_forward(model, clean, mask, torch.zeros_like(ones), patch).logits
    # a mask that requires grad runs the general per-destination path even when it is all ones
    traced = circuits.patched_forward(model, clean, mask, ones.clone().requires_grad_(True)).logits.detach()
    with torch.no_grad():
        reference = model.hf(clean, attention_mask=mask).logits
        first = max((full - reference)[real].abs().max().item(), (traced - reference)[real].abs().max().item())
        second = (empty - model.hf(corrupted, attention_mask=mask).logits)[real].abs().max().item()
        third = 0.0
        for edge in edges:
            edge_mask = ones.clone()
            edge_mask[graph.index(edge)] = 0
            got = circuits.patched_forward(model, clean, mask, edge_mask, patch).logits
            ablation = oracle.source_output(edge.split("->")[0], corrupted, mask)
            expected = oracle.patch_edge(edge, clean, mask, ablation)
            third = max(third, (got - expected)[real].abs().max().item())
    return first, second, third


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-smollm2", action="store_true")
    args = parser.parse_args()
    print(f"{'architecture':22s} {'1: ones vs HF':>14s} {'2: zeros vs corr.':>18s} {'3: edge vs oracle':>18s}")
    clean, corrupted, mask = tiny_pair()
    for name in ARCHITECTURES:
        model = circuits.Model.from_hf(tiny_hf(name))
        print(
            f"{'tiny ' + name:22s} "
            + " ".join(f"{x:>17.2e}" for x in deviations(model, clean, corrupted, mask, TINY_EDGES))
        )
    if not args.no_smollm2:
        model = circuits.load_model("smollm2-135m", device="cpu")
        tok = model.tokenizer
        clean_text = ["When John and Mary went to the store, John gave a drink to", "The capital of France is"]
        corrupted_text = ["When Anna and Peter went to the store, Kate gave a drink to", "The capital of Spain is"]
        c = tok(clean_text, return_tensors="pt", padding=True, padding_side="right")
        k = tok(corrupted_text, return_tensors="pt", padding=True, padding_side="right")
        figures = deviations(model, c.input_ids, k.input_ids, c.attention_mask, SMOLLM2_EDGES)
        print(f"{'smollm2-135m':22s} " + " ".join(f"{x:>17.2e}" for x in figures))


if __name__ == "__main__":
    main()
