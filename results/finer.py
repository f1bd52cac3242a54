"""What results/positions/run.py and results/neurons/run.py share: the setting, and the loop that runs each
task once (one JSON per task under the script's runs/, skipped when present unless --force) and then rebuilds
the script's README and figures from every JSON there."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import circuits
from circuits.io import write_json

MODEL = "smollm2-135m"
N = 32  # examples per task, seed 0
METHOD, IG_STEPS = "eap-ig-inputs", 5
TASKS = ("ioi", "greater_than")


def records(here: Path) -> list[dict]:
    """The JSON of every task run so far, in ``TASKS`` order."""
    runs = here / "runs"
    return [json.loads((runs / f"{name}.json").read_text()) for name in TASKS if (runs / f"{name}.json").exists()]


def main(
    here: Path,
    description: str,
    run_task: Callable[[circuits.Model, str], dict],
    rebuild: Callable[[list[dict]], None],
) -> None:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--force", action="store_true", help="run tasks whose JSON exists again")
    args = parser.parse_args()
    runs = here / "runs"
    todo = [name for name in args.tasks if args.force or not (runs / f"{name}.json").exists()]
    if todo:
        model = circuits.load_model(MODEL, device="cpu")
        for name in todo:
            print(f"{name} ...", file=sys.stderr)
            write_json(runs / f"{name}.json", run_task(model, name))
    done = records(here)
    if done:
        rebuild(done)
