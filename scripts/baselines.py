"""How a bundled model does on every catalogue task: ``python scripts/baselines.py [--model gemma3-270m]``.

Writes ``results/baselines.csv`` (``results/<model>/baselines.csv`` for another model than SmolLM2): task,
n, clean_metric, corrupted_metric, accuracy, chance, near_chance, and a note for a task the model's tokenizer
cannot express; and prints it. ``chance`` is the accuracy of random logits: per example, the chance that the
best of the answers beats the best of the wrong answers, |answers| / (|answers| + |wrong answers|).
A task is flagged near chance when its accuracy is within 0.1 of that.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd

import circuits
from circuits import tasks
from circuits.io import atomic_write_text

RESULTS = Path(__file__).resolve().parent.parent / "results"
MODEL = "smollm2-135m"
NEAR_CHANCE = 0.1


def chance_accuracy(task: circuits.Task) -> float:
    """The accuracy random logits would get: the mean over examples of |answers| / (|answers| + |wrong|)."""
    ids = task.token_ids
    answers = ids["answer_ids"] if ids else task.answers
    wrong = ids["wrong_answer_ids"] if ids else task.wrong_answers

    def size(answer) -> int:
        return len(answer) if isinstance(answer, list) else 1

    return sum(size(a) / (size(a) + size(w)) for a, w in zip(answers, wrong, strict=True)) / len(answers)


def baselines(model: circuits.Model, n: int = 128, seed: int = 0, verbose: bool = True) -> pd.DataFrame:
    rows = []
    for name in tasks.available():
        started = time.perf_counter()
        try:
            task = tasks.get(name, model.tokenizer, n=n, seed=seed)
        except circuits.CircuitsError as error:  # a template this tokenizer cannot express: said, not hidden
            rows.append({"task": name, "n": 0, "note": str(error)})
            if verbose:
                print(f"  {name}: skipped: {error}", flush=True)
            continue
        baseline = task.baseline(model)
        chance = chance_accuracy(task)
        rows.append(
            {
                "task": name,
                "n": len(task),
                "clean_metric": baseline.clean,
                "corrupted_metric": baseline.corrupted,
                "accuracy": baseline.accuracy,
                "chance": chance,
                "near_chance": baseline.accuracy <= chance + NEAR_CHANCE,
            }
        )
        if verbose:
            print(f"  {name}: {time.perf_counter() - started:.1f} s", flush=True)
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=128, help="examples per task (default 128)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default=MODEL, help=f"a bundled model (default {MODEL})")
    parser.add_argument("--output", type=Path, help="default: results/baselines.csv, or results/<model>/ for another")
    args = parser.parse_args(argv)
    output = args.output or (RESULTS if args.model == MODEL else RESULTS / args.model) / "baselines.csv"

    model = circuits.load_model(args.model)
    print(f"{model}\nlogit_diff baselines, {args.n} examples a task, seed {args.seed}:", flush=True)
    table = baselines(model, n=args.n, seed=args.seed)
    atomic_write_text(output, table.to_csv(index=False, float_format="%.4f"))
    print(table.to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    flagged = table.task[table.near_chance.fillna(False).astype(bool)].tolist()
    if flagged:
        print(f"near chance (accuracy within {NEAR_CHANCE} of random guessing): {', '.join(flagged)}")
    else:
        print("no task is near chance")
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
