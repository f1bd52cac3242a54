"""Mask learning on SmolLM2 (IOI): one learned circuit of a few hundred edges, its faithfulness and seconds.

Learns a circuit with ``circuits.learn_circuit`` (Edge Pruning by default), evaluates it with
``circuits.evaluate`` (the same ablation) and, for reference, EAP-IG's circuit of the same size. Also the
cost of one learning step against the plain forward + backward of the same batch (the floor), measured in
the same process. Seconds depend on the machine; a busy 2-core CPU is far slower with 2 threads than with 1.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/learn.py [--method edge-pruning|ugs] [--target 300]
        [--steps 40] [--batch-size 8] [--n 32] [--lr 0.8] [--no-compare]
"""

from __future__ import annotations

import argparse
import time

import torch

import circuits
from circuits import tasks
from circuits.methods import learn


def floor_seconds(model: circuits.Model, task, batch_size: int) -> float:
    """One forward + backward of the plain HF model on the first batch (gradients to the input embeddings)."""
    tokens = task.tokenize(model.tokenizer)[:batch_size]
    embeddings = model.hf.get_input_embeddings()(tokens.clean_ids).detach().requires_grad_(True)
    start = time.perf_counter()
    logits = model.hf(inputs_embeds=embeddings, attention_mask=tokens.attention_mask).logits
    logits[torch.arange(len(tokens)), tokens.positions].logsumexp(-1).sum().backward()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="edge-pruning", choices=learn.LEARN_METHODS)
    parser.add_argument("--target", type=int, default=300)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--samples", type=int, default=None, help="UGS: masks per step")
    parser.add_argument("--no-compare", action="store_true", help="skip EAP-IG's circuit of the same size")
    args = parser.parse_args()

    model = circuits.load_model("smollm2-135m", device="cpu")
    task = tasks.get("ioi", model.tokenizer, n=args.n, seed=0)
    floor = min(floor_seconds(model, task, args.batch_size) for _ in range(2))
    extra = {} if args.samples is None else {"samples": args.samples}
    start = time.perf_counter()
    circuit = circuits.learn_circuit(
        model, task, args.method, target_edges=args.target, steps=args.steps, lr=args.lr,
        batch_size=args.batch_size, **extra,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    evaluation = circuits.evaluate(model, task, circuit)
    meta = circuit.meta
    print(f"{model}, {task}, {torch.get_num_threads()} thread(s)")
    print(
        f"{args.method}: {args.steps} steps of {args.batch_size} examples, lr {meta['lr']}, target {args.target} edges"
    )
    print(f"  seconds: {seconds:.1f} in all, {seconds / args.steps:.2f} per step; plain forward+backward {floor:.2f}")
    print(f"  per step / floor: {seconds / args.steps / floor:.1f}x")
    print(f"  final loss {meta['loss']:.4g} (faithfulness loss {meta['faithfulness_loss']:.4g})")
    print(f"  expected edges at the end {meta['expected_edges']:.1f} of {len(model.graph):,}")
    print(f"  circuit: {len(circuit)} edges after pruning ({meta['selection']['edges_before_pruning']} selected)")
    print(
        f"  faithfulness {evaluation.faithfulness:.3f} (logit diff {evaluation.circuit:.3f}; full "
        f"{evaluation.full:.3f}, empty {evaluation.empty:.3f}), accuracy {evaluation.accuracy:.2f}"
    )
    if not args.no_compare:
        start = time.perf_counter()
        scores = circuits.attribute(model, task, "eap-ig-inputs", progress=False)
        reference = scores.most_helpful(args.target)
        compared = circuits.evaluate(model, task, reference)
        print(
            f"  EAP-IG (inputs) most_helpful({args.target}): {len(reference)} edges, faithfulness "
            f"{compared.faithfulness:.3f} ({time.perf_counter() - start:.1f} s)"
        )


if __name__ == "__main__":
    main()
