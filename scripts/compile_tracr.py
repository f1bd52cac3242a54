"""Compile the ACDC paper's two tracr programs and write them as ground-truth directories.

Needs tracr (``pip install -e ".[tracr]"``: jax, haiku) besides this package's own requirements;
nothing else in ``circuits`` does. From the repository root:

    python scripts/compile_tracr.py

writes ``circuits/ground_truth/data/tracr-reverse/`` and ``tracr-proportion/`` (``config.json``,
``model.safetensors``, ``task.json``, ``truth.json``). The settings follow the ACDC paper
(Conmy et al. 2023): ``make_reverse`` over the vocabulary {1, 2, 3} and ``make_frac_prevs`` of
``tokens == "x"`` over {w, x, y, z}, both with max_seq_len 5 and BOS "BOS"; reverse runs on the six
permutations of 1 2 3, proportion on every string of four letters. Each example is patched with
another example (a seeded shuffle without fixed points), and the metric is the ACDC paper's L2
over every output position.

Before writing, the script checks that the converted model reproduces tracr's own compiled
forward (the output-space projection of its final residual stream, and every layer's residual
stream) and the RASP program's own outputs on every input.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from circuits.ground_truth import DATA
from circuits.ground_truth.tracr import edge_effects, from_tracr, native_from_tracr, weight_edges
from circuits.io import atomic_write_text

COMMAND = "python scripts/compile_tracr.py"  # in an environment with the tracr extra (jax)
SEED = 0
INERT_TOLERANCE = 1e-3
NUMERIC_TOLERANCE = 1e-3


@dataclass
class Spec:
    """One program to compile: how to build it and which inputs the task runs."""

    program: str  # the tracr call, as text (for the task file)
    vocab: tuple
    max_seq_len: int
    inputs: list[list[Any]]
    description: str


SPECS = {
    "tracr-reverse": Spec(
        program="tracr.compiler.lib.make_reverse(rasp.tokens)",
        vocab=(1, 2, 3),
        max_seq_len=5,
        inputs=[list(p) for p in itertools.permutations([1, 2, 3])],
        description=(
            "tracr-compiled reverse (the ACDC paper's tracr-reverse): outputs the input sequence reversed; "
            "length by a selector-width attention head and MLP, opp_idx = length - index - 1 by two MLPs, "
            "then one attention head copies the token at opp_idx. Inputs: the six permutations of 1 2 3 after BOS."
        ),
    ),
    "tracr-proportion": Spec(
        program='tracr.compiler.lib.make_frac_prevs(rasp.tokens == "x")',
        vocab=("w", "x", "y", "z"),
        max_seq_len=5,
        inputs=[list(p) for p in itertools.product("wxyz", repeat=4)],
        description=(
            "tracr-compiled frac_prevs (the ACDC paper's tracr-proportion): at each position, the fraction of "
            "tokens so far that are 'x' (a number, logit 0); an MLP marks the x tokens and one attention head "
            "averages the marks over previous positions. Inputs: all 256 strings of four letters from w x y z."
        ),
    ),
}


def compile_program(name: str):
    """The RASP program of ``name`` and its assembled model (imports tracr)."""
    from tracr.compiler import compiling, lib
    from tracr.rasp import rasp

    spec = SPECS[name]
    if name == "tracr-reverse":
        program = lib.make_reverse(rasp.tokens)
    else:
        program = lib.make_frac_prevs(rasp.tokens == "x")
    assembled = compiling.compile_rasp_to_model(
        program, vocab=set(spec.vocab), max_seq_len=spec.max_seq_len, compiler_bos="BOS"
    )
    return program, assembled


def check_against_tracr(assembled: Any, native: torch.nn.Module, info, inputs: list[list[Any]]) -> float:
    """Largest difference between tracr's own residual streams and the native model's, over all inputs."""
    worst = 0.0
    for sequence in inputs:
        output = assembled.apply(["BOS", *sequence])
        ids = torch.tensor([info.encode(sequence)])
        streams = []
        with torch.no_grad():
            x = native.embed_tokens(ids, torch.arange(ids.shape[1])[None])
            allowed = native.allowed(torch.ones_like(ids))
            for block in native.blocks:
                x = x + block.attn(x, allowed)
                streams.append(x[0].numpy())
                x = x + block.mlp(x)
                streams.append(x[0].numpy())
            logits = native(ids).logits[0].numpy()
        theirs = [np.asarray(r)[0] for r in output.residuals]
        for ours, reference in zip(streams, theirs, strict=True):
            worst = max(worst, float(np.abs(ours - reference).max()))
        final = np.asarray(output.transformer_output)[0]
        projected = final @ native.W_U.detach().numpy()
        worst = max(worst, float(np.abs(projected - logits).max()))
    return worst


def build(name: str, root: Path = DATA) -> dict[str, Any]:
    """Compile, convert, check and write one ground-truth directory; returns a summary."""
    from tracr.rasp import rasp

    spec = SPECS[name]
    program, assembled = compile_program(name)
    expected = [list(rasp.evaluate(program, sequence)) for sequence in spec.inputs]
    model, task, edges = from_tracr(
        assembled,
        spec.inputs,
        outputs=expected,
        name=name,
        metric="l2",
        inert_tolerance=INERT_TOLERANCE,
        tolerance=NUMERIC_TOLERANCE,
        seed=SEED,
    )
    native, info = native_from_tracr(assembled)
    difference = check_against_tracr(assembled, model.hf, info, spec.inputs)
    if difference > 1e-4:
        raise SystemExit(f"{name}: the native model differs from tracr's forward by {difference:.2e}")
    accuracy = task.baseline(model).accuracy
    if accuracy != 1.0:
        raise SystemExit(f"{name}: the native model reproduces the program's outputs on {accuracy:.1%} of inputs only")
    weights = weight_edges(model.hf, model.graph)
    effects = edge_effects(model, task, sorted(weights))
    directory = root / name
    model.hf.save(directory)
    task_json = {
        **task.to_dict(),
        "description": spec.description,
        "vocab": info.input_vocab,
        "vocab_out": info.output_vocab,
        "bos": info.input_vocab[info.bos_id],
        "program": spec.program,
        "compiler": {"vocab": list(spec.vocab), "max_seq_len": spec.max_seq_len, "compiler_bos": "BOS"},
        "program_outputs": [[_plain(v) for v in row] for row in expected],
        "versions": {package: importlib.metadata.version(package) for package in ("tracr-pypi", "jax")},
    }
    truth = {
        "edges": sorted(edges),
        "how": (
            "Read off the compiled weights: an edge u->v is a weight edge when a residual direction u writes "
            "(non-zero column of its embeddings, W_O or W_out) is one v reads (non-zero row of W_Q, W_K, W_V, "
            "W_in or W_U). Weight edges whose single-edge ablation (zero and patching, every input) moves no "
            f"output at a scored position by more than {INERT_TOLERANCE} are dropped as inert; 'weight_edges' "
            "lists them all and 'effects' the largest output change of each."
        ),
        "script": COMMAND,
        "weight_edges": sorted(weights),
        "effects": {edge: effects[edge] for edge in sorted(effects)},
    }
    atomic_write_text(directory / "task.json", _one_key_a_line(task_json))
    atomic_write_text(directory / "truth.json", json.dumps(truth, indent=1) + "\n")
    return {
        "name": name,
        "edges": len(model.graph.edges),
        "true_edges": sorted(edges),
        "inert_weight_edges": sorted(weights - edges),
        "max_difference_from_tracr": difference,
        "examples": len(task),
    }


def _one_key_a_line(data: dict[str, Any]) -> str:
    """JSON with one top-level key a line: compact, readable and diffable."""
    lines = [f"{json.dumps(key)}: {json.dumps(value)}" for key, value in data.items()]
    return "{\n " + ",\n ".join(lines) + "\n}\n"


def _plain(value: Any) -> Any:
    """A program output as JSON (RASP's numerical mean of one boolean is that boolean)."""
    if isinstance(value, (bool, np.bool_)):
        return float(value)
    if isinstance(value, np.generic):
        return value.item()
    return value


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", default=sorted(SPECS), help="which programs (default: all)")
    parser.add_argument("--root", type=Path, default=DATA, help="where the directories go")
    args = parser.parse_args(argv)
    for name in args.names:
        if name not in SPECS:
            raise SystemExit(f"unknown program {name!r}; choose from {', '.join(sorted(SPECS))}")
        summary = build(name, args.root)
        print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
