"""The `circuits` command: discover, evaluate and plot circuits; list tasks and models.

    circuits discover --model smollm2-135m --task ioi --method eap-ig-inputs --top-n 200 --out runs/ioi
    circuits evaluate runs/ioi/circuit.json --task ioi
    circuits plot runs/ioi/circuit.json -o fig.pdf
    circuits tasks
    circuits models

Exit status: 0 on success; 2 on bad usage or bad input (a ``CircuitsError``: one line on stderr
that names the problem, no traceback); 1 on anything else, which is a bug or a failure of the
environment (a short message and the hint to rerun with CIRCUITS_DEBUG=1 for the traceback);
130 when interrupted. With CIRCUITS_DEBUG=1 every error shows its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from . import distributed
from .choices import ABLATIONS, BACKWARDS, CIRCUIT_LEVELS, METHODS, METRICS, SELECTIONS
from .errors import CircuitsError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class UsageError(CircuitsError):
    """A mistake in what the user asked for."""


class Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line (and exit status 2), not the whole usage text."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if distributed.launched():  # under torchrun: every rank runs the command, rank 0 writes and reports
            distributed.init()
            if not distributed.is_main():
                args.quiet = True
                sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the rest of this process)
        return args.run(args)
    except KeyboardInterrupt:
        print(f"circuits: interrupted (files already written are complete){_resume_hint(args)}", file=sys.stderr)
        return 130
    except Exception as error:
        if os.environ.get("CIRCUITS_DEBUG"):
            raise
        text = str(error).strip()
        if isinstance(error, distributed.RankFailure) and not distributed.is_main():
            return 1  # another rank's failure, which rank 0 reports
        if isinstance(error, CircuitsError):
            print(
                f"circuits {args.command}: error: {text.splitlines()[0] if text else type(error).__name__}",
                file=sys.stderr,
            )
            return 2
        first = text.splitlines()[0] if text else ""
        print(
            f"circuits {args.command}: internal error: {type(error).__name__}: {first[:300]}\n"
            "This is a bug or a problem of the environment, not of your input; rerun with CIRCUITS_DEBUG=1 "
            "to see the traceback.",
            file=sys.stderr,
        )
        return 1


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="circuits", description="Automated circuit discovery for transformer language models.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)

    discover = commands.add_parser("discover", help="score every edge, select a circuit, evaluate it, write a folder")
    _model_options(discover)
    _task_options(discover)
    discover.add_argument(
        "--method",
        default="eap-ig-inputs",
        choices=METHODS,
        help="edge scoring method (README's method table): eap-ig-activations interpolates one layer's outputs at "
        "a time, as EAP-IG and MIB do; eap-ig-mask integrates the gradient of every edge's mask",
    )
    discover.add_argument("--ablation", default="patching", choices=ABLATIONS)
    discover.add_argument("--top-n", type=_positive, default=200, help="circuit size in edges (before pruning)")
    discover.add_argument("--select", default="signed", choices=SELECTIONS, help="how the top edges are chosen")
    discover.add_argument("--acdc", action="store_true", help="refine the method's best candidates with ACDC")
    discover.add_argument("--threshold", type=_non_negative, default=0.01, help="ACDC threshold on --acdc-metric")
    discover.add_argument("--acdc-metric", default="kl", choices=METRICS, help="what ACDC's threshold bounds")
    discover.add_argument(
        "--candidates", type=_positive, default=500, help="edges ACDC starts from (the method's best, by --select)"
    )
    discover.add_argument(
        "--compare",
        nargs="*",
        default=[],
        choices=METHODS,
        metavar="METHOD",
        help="more methods whose faithfulness curves are drawn alongside",
    )
    discover.add_argument(
        "--ig-steps", type=_positive, default=5, help="steps of the EAP-IG methods (eap-ig-activations: per layer)"
    )
    discover.add_argument(
        "--backward",
        default="gradient",
        choices=BACKWARDS,
        help="the gradient method's backward pass: exact gradients, or GIM's or RelP's rules",
    )
    discover.add_argument(
        "--positions",
        action="store_true",
        help="score and keep edges by span (the task's declared spans, or every position of one-template prompts)",
    )
    discover.add_argument(
        "--level",
        default="edge",
        choices=CIRCUIT_LEVELS,
        help="the circuit's units: edges, or the best output dimensions (neuron) or MLP hidden units (mlp-neuron)",
    )
    discover.add_argument(
        "--full-json",
        action="store_true",
        help="circuit.json lists every edge (the EAP-IG/MIB layout), not the circuit's",
    )
    discover.add_argument("--out", required=True, type=Path, help="output folder")
    discover.add_argument(
        "--checkpoint",
        type=Path,
        metavar="DIR",
        help="folder for the resumable state of each long phase: rerun the same command to resume where it stopped",
    )
    discover.set_defaults(run=run_discover)

    evaluate = commands.add_parser("evaluate", help="faithfulness of a circuit file, and its curve when it has scores")
    evaluate.add_argument("circuit", type=Path, help="circuit JSON file")
    _model_options(evaluate, required=False)
    _task_options(evaluate)
    evaluate.add_argument("--ablation", choices=ABLATIONS, help="default: the circuit's own")
    evaluate.add_argument(
        "--scores", type=Path, help="every edge's score for the curve (default: scores.csv beside the circuit file)"
    )
    evaluate.add_argument("--out", type=Path, help="folder for evaluation.json and faithfulness.png")
    evaluate.set_defaults(run=run_evaluate)

    plot = commands.add_parser("plot", help="draw a circuit file (PNG, PDF or SVG by extension)")
    plot.add_argument("circuit", type=Path, help="circuit JSON file")
    plot.add_argument("-o", "--output", type=Path, required=True, help="figure file: .png, .pdf or .svg")
    plot.add_argument("--title", help="figure title")
    plot.set_defaults(run=run_plot)

    commands.add_parser("tasks", help="the task catalogue, one line each").set_defaults(run=run_tasks)
    commands.add_parser("models", help="bundled models and supported architectures").set_defaults(run=run_models)
    return parser


def _model_options(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument(
        "--model", required=required, default=None, help="bundled name (smollm2-135m), HF id or local directory"
    )
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    parser.add_argument(
        "--device-map",
        default=None,
        metavar="MAP",
        help="instead of --device, for a model larger than one device: auto (GPUs, then CPU, then disk), balanced, "
        'sequential, or a JSON object of module name -> GPU index, "cpu" or "disk"',
    )
    parser.add_argument(
        "--max-memory", default=None, metavar="DEV=SIZE,...", help="with --device-map: e.g. 0=20GiB,1=20GiB,cpu=64GiB"
    )
    parser.add_argument("--offload-folder", type=Path, default=None, help="with --device-map: for weights on disk")
    parser.add_argument("--dtype", default="float32", choices=DTYPES)
    parser.add_argument(
        "--batch-size",
        type=_batch_size,
        default="auto",
        metavar="N|auto",
        help="examples per batch; auto (the default): as many as fit --batch-memory, measured on a first small "
        "batch. A batch that runs out of memory is retried with half as many examples",
    )
    parser.add_argument(
        "--batch-memory",
        type=_memory,
        default=None,
        metavar="SIZE",
        help="memory the batches of --batch-size auto may use, e.g. 8GiB or 500MB (default: what the device has free)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars or phase messages")


def _task_options(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--task", help="a catalogue task (see `circuits tasks`)")
    source.add_argument("--task-file", type=Path, help="your own task: JSONL with clean, corrupted, answers, ...")
    parser.add_argument(
        "--n",
        "--examples",
        dest="n",
        type=_positive,
        default=None,
        help="examples (catalogue default 64; file: all); under torchrun write --examples (torchrun takes --n)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the catalogue task's examples")
    parser.add_argument("--metric", default="logit_diff", choices=METRICS)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _batch_size(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return _positive(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or auto, got {text!r}") from None


def _memory(text: str) -> int:
    from .batching import parse_memory

    try:
        return parse_memory(text, "the size")
    except CircuitsError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def _log(args: argparse.Namespace):
    return (lambda message: None) if args.quiet else (lambda message: print(f"[circuits] {message}", file=sys.stderr))


def _load_model(args: argparse.Namespace, name: str, named_by: Path | None = None):
    """The model ``name`` on ``--device`` (checked first: any unavailable backend is a one-line error). A local
    folder is named by its absolute path, which the circuit meta and summary keep so that ``circuits evaluate``
    finds it from any folder. ``named_by``: the circuit file that named the model (its errors say: pass --model)."""
    from .model import BUNDLED, load_model, resolve_device

    placement = _placement_arguments(args)
    device = None if placement else resolve_device(args.device)
    if not placement and args.device is None and distributed.active():
        device = distributed.device()  # cuda:LOCAL_RANK under NCCL, else the CPU
    if name not in BUNDLED and Path(name).exists():
        name = str(Path(name).resolve())
    if args.quiet:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    _log(args)(f"loading model {name}")
    try:
        return load_model(name, device=device, dtype=DTYPES[args.dtype], **placement)
    except CircuitsError as error:
        if named_by is None:
            raise
        reason = (str(error).splitlines() or [""])[0]
        raise UsageError(f"{named_by} names model {name!r}, which cannot be loaded; pass --model ({reason})") from None


def _placement_arguments(args: argparse.Namespace) -> dict:
    """``load_model``'s device_map, max_memory and offload_folder from the command line ({} without --device-map;
    load_model judges what they name)."""
    import json

    device_map, max_memory_text = getattr(args, "device_map", None), getattr(args, "max_memory", None)
    offload_folder = getattr(args, "offload_folder", None)
    if device_map is None:
        for flag, value in (("--max-memory", max_memory_text), ("--offload-folder", offload_folder)):
            if value is not None:
                raise UsageError(f"{flag} goes with --device-map")
        return {}
    if args.device is not None:
        raise UsageError("pass --device or --device-map, not both")
    if device_map.lstrip().startswith("{"):
        try:
            device_map = json.loads(device_map)
        except json.JSONDecodeError as error:
            raise UsageError(f"--device-map is not a JSON object: {error}") from None
    max_memory = None
    if max_memory_text is not None:
        max_memory = {}
        for entry in max_memory_text.split(","):
            device, _, size = entry.strip().partition("=")
            if not device or not size:
                raise UsageError(f"--max-memory entry {entry!r} is not DEVICE=SIZE (e.g. 0=20GiB or cpu=64GiB)")
            max_memory[int(device) if device.isdigit() else device] = int(size) if size.isdigit() else size
    return {"device_map": device_map, "max_memory": max_memory, "offload_folder": offload_folder}


def _read_task(args: argparse.Namespace):
    """The task file's task, read before the (slow) model load so that its mistakes show at once; a catalogue
    task's name is checked here too (its examples are drawn once the tokenizer is known)."""
    from .task import Task

    if args.task_file is None:
        from circuits import tasks

        if args.task not in tasks.available():
            raise UsageError(f"unknown task {args.task!r}; available tasks: {', '.join(tasks.available())}")
        return None
    if args.task_file.is_dir():
        raise UsageError(f"task file {args.task_file} is a folder; give a JSONL file")
    if not args.task_file.is_file():
        raise UsageError(f"task file {args.task_file} does not exist")
    task = Task.from_jsonl(args.task_file, metric=args.metric)
    if args.n is not None:
        if args.n > len(task):
            raise UsageError(f"--n {args.n} asks for more examples than {args.task_file} holds ({len(task)})")
        task = task.subset(args.n)
    return task


def _fit_task(args: argparse.Namespace, task, model):
    """The catalogue task drawn for the model's tokenizer (or the file's task), tokenized: an example that cannot
    be patched fails here, named, before any long work."""
    if task is None:
        from circuits import tasks

        task = tasks.get(args.task, model.tokenizer, n=args.n or 64, seed=args.seed)
        task.metric = args.metric
    task.check(model)  # lengths against the model's positions, every id against its vocabulary
    return task


def _resume_hint(args: argparse.Namespace) -> str:
    """What an interrupted discover run can do next."""
    if getattr(args, "command", None) != "discover":
        return ""
    if args.checkpoint is None:
        return "; rerun with --checkpoint DIR to make a long run resumable"
    return f"; rerun the same command to resume from {args.checkpoint}"


def run_discover(args: argparse.Namespace) -> int:
    from .io import check_writable_folder
    from .methods import check_backward, check_gradient_metric
    from .pipeline import check_granularity, check_output_folder, discover, unit_word

    for method in (args.method, *args.compare):  # the task's metric is --metric: refuse before the model loads
        check_gradient_metric(method, args.metric, args.ig_steps)
    check_backward(args.method, args.backward)
    check_granularity(args.positions, args.level, args.select, args.acdc)
    task = _read_task(args)
    check_output_folder(args.out)
    if args.checkpoint is not None:
        check_writable_folder(args.checkpoint, "--checkpoint folder")
    model = _load_model(args, args.model)
    task = _fit_task(args, task, model)
    summary = discover(
        model,
        task,
        args.out,
        method=args.method,
        ablation=args.ablation,
        top_n=args.top_n,
        selection=args.select,
        acdc_threshold=args.threshold if args.acdc else None,
        candidates=args.candidates,
        acdc_metric=args.acdc_metric,
        compare=args.compare,
        batch_size=args.batch_size,
        max_memory=args.batch_memory,
        ig_steps=args.ig_steps,
        progress=not args.quiet,
        log=_log(args),
        full_json=args.full_json,
        checkpoint=args.checkpoint,
        backward=args.backward,
        positions=args.positions,
        level=args.level,
    )
    e, c = summary["evaluation"], summary["circuit"]
    print(f"circuit: {c['edges']} {unit_word(c)}, {c['nodes']} nodes; faithfulness {e['faithfulness']:.3f}")
    for label, curve in summary["curves"].items():
        print(f"{label}: CPR {curve['cpr']:.3f}, CMD {curve['cmd']:.3f}")
    print(f"wrote {args.out}/: {', '.join(summary['files'])}")
    print(f"figures: {args.out / 'circuit.png'}, {args.out / 'circuit.pdf'}, {args.out / 'faithfulness.png'}")
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    from .batching import BatchPlan
    from .circuit import Circuit
    from .evaluate import evaluate, faithfulness_curve
    from .io import check_writable_folder, write_json
    from .pipeline import number_text, scores_for, undefined_notes, unit_word

    task = _read_task(args)
    if args.out is not None:
        check_writable_folder(args.out, "--out folder")
    circuit = Circuit.load(args.circuit)
    name = args.model or circuit.meta.get("model")
    if not name or not isinstance(name, str):
        raise UsageError(f"{args.circuit} does not name its model; pass --model")
    model = _load_model(args, name, named_by=None if args.model else args.circuit)
    circuit = Circuit.load(args.circuit, model)
    task = _fit_task(args, task, model)
    ablation = args.ablation or circuit.meta.get("ablation", "patching")
    log = _log(args)
    units = unit_word({"level": circuit.level})
    log(f"evaluating {len(circuit)} {units} on {task.name} ({len(task)} examples, {ablation} ablation)")
    plan = BatchPlan(args.batch_size, model.device, args.batch_memory)  # the evaluation and the curve: one layout
    evaluation = evaluate(model, task, circuit, ablation, plan)
    result = {
        "circuit": str(args.circuit),
        "model": model.name,
        "task": task.name,
        "n": len(task),
        "ablation": ablation,
        "level": circuit.level,
        "edges": len(circuit),  # units: edges (at a span), or neurons
        "faithfulness": evaluation.faithfulness,
        "metric_full": evaluation.full,
        "metric_circuit": evaluation.circuit,
        "metric_empty": evaluation.empty,
        "accuracy_circuit": evaluation.accuracy,
    }
    print(
        f"faithfulness {number_text(evaluation.faithfulness)} (metric full {evaluation.full:.3f}, circuit "
        f"{evaluation.circuit:.3f}, empty {evaluation.empty:.3f}); circuit accuracy {evaluation.accuracy:.3f}"
    )
    scores_csv = args.scores or args.circuit.with_name("scores.csv")
    if args.scores is not None and not args.scores.is_file():
        raise UsageError(f"scores file {args.scores} does not exist")
    scores = scores_for(circuit, scores_csv if scores_csv.is_file() else None)
    curve = None
    if scores is None:
        print(f"no curve: neither the circuit file nor {scores_csv} has a score for every edge")
    else:
        log("faithfulness curve on the MIB grid")
        curve = faithfulness_curve(model, task, scores, ablation=ablation, batch_size=plan)
        result.update(cpr=curve.cpr, cmd=curve.cmd, curve=curve.frame.to_dict(orient="list"))
        print(f"CPR {number_text(curve.cpr)}, CMD {number_text(curve.cmd)}")
    result["notes"] = undefined_notes(result)  # evaluation.json is strict JSON: an undefined value is null
    for note in result["notes"]:
        print(f"note: {note}")
    if args.out is not None and distributed.is_main():
        args.out.mkdir(parents=True, exist_ok=True)
        write_json(args.out / "evaluation.json", result)
        if curve is not None:
            curve.plot(path=args.out / "faithfulness.png")
        print(f"wrote {args.out}/")
    return 0


def run_plot(args: argparse.Namespace) -> int:
    from .circuit import Circuit

    if args.output.suffix.lower() not in (".png", ".pdf", ".svg"):
        raise UsageError(f"cannot tell the figure format of {args.output}: use .png, .pdf or .svg")
    circuit = Circuit.load(args.circuit)
    circuit.plot(args.output, title=args.title)
    print(f"wrote {args.output}")
    return 0


def run_tasks(args: argparse.Namespace) -> int:
    from circuits import tasks

    catalogue = tasks.available()
    width = max(map(len, catalogue))
    for name, description in catalogue.items():
        print(f"{name:<{width}}  {description}")
    return 0


def run_models(args: argparse.Namespace) -> int:
    from .arch import ADAPTERS, supported_model_types
    from .model import BUNDLED

    print("bundled (offline):")
    for name, description in BUNDLED.items():
        print(f"  {name}  {description}")
    print("any HF id or local directory of these model types:")
    types = supported_model_types()
    width = max(map(len, types))
    for model_type in types:
        print(f"  {model_type:<{width}}  {ADAPTERS[model_type].model_types[model_type]}")
    from . import ground_truth

    names = ground_truth.available()
    if names:
        print(f"models with known circuits (Python: circuits.ground_truth.load(name)): {', '.join(names)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
