"""Run the notebooks top to bottom and write them back with their outputs, as they are committed.

    .venv/bin/python notebooks/run.py                     # every notebook
    .venv/bin/python notebooks/run.py ioi_walkthrough     # one of them

Each notebook runs in a fresh IPython kernel of *this* interpreter (nbclient; any kernel specs
installed elsewhere are ignored), with the notebooks folder as working directory, and is written
back atomically only when every cell ran without an error. Two messages that say nothing about
the notebooks are kept out of the committed outputs: Hugging Face's weight-loading progress bar
(``HF_HUB_DISABLE_PROGRESS_BARS=1``) and tqdm's warning that ipywidgets is not installed (the
notebooks pass ``progress=False``, so no progress bar would use it).

A notebook may have one code cell tagged ``parameters`` (its documented settings, as assignments).
``execute(..., parameters={"N": 8})`` inserts a cell tagged ``injected-parameters`` right after it
that overrides them: the tests use it to run the notebooks on fewer examples.
"""

from __future__ import annotations

import argparse
import ast
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import nbformat
from jupyter_client.kernelspec import NATIVE_KERNEL_NAME, KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient

from circuits.io import atomic_write_text

HERE = Path(__file__).resolve().parent
NOTEBOOKS: dict[str, Path] = {
    "quickstart": HERE / "quickstart.ipynb",
    "ioi_walkthrough": HERE / "ioi_walkthrough.ipynb",
}
KERNEL_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1"}
KERNEL_WARNING_FILTERS = ("ignore:IProgress not found",)  # PYTHONWARNINGS entries: action:message-prefix
TIMEOUT_S = 1800  # per cell


def kernel_manager() -> AsyncKernelManager:
    """A manager for an IPython kernel run by ``sys.executable`` (ipykernel's own spec, not any installed one)."""
    specs = KernelSpecManager(kernel_dirs=[])  # only the native kernel: [sys.executable, -m, ipykernel_launcher, ...]
    return AsyncKernelManager(kernel_name=NATIVE_KERNEL_NAME, kernel_spec_manager=specs)


def kernel_environment() -> dict[str, str]:
    """This process's environment plus ``KERNEL_ENV`` and the warning filters."""
    filters = [os.environ["PYTHONWARNINGS"]] if os.environ.get("PYTHONWARNINGS") else []
    return {**os.environ, **KERNEL_ENV, "PYTHONWARNINGS": ",".join([*filters, *KERNEL_WARNING_FILTERS])}


def parameter_names(source: str) -> set[str]:
    """The names a ``parameters`` cell assigns at top level."""
    names = set()
    for statement in ast.parse(source).body:
        targets = statement.targets if isinstance(statement, ast.Assign) else [getattr(statement, "target", None)]
        names.update(target.id for target in targets if isinstance(target, ast.Name))
    return names


def inject_parameters(notebook: nbformat.NotebookNode, parameters: Mapping[str, Any]) -> nbformat.NotebookNode:
    """Insert a cell overriding ``parameters`` right after the cell tagged ``parameters``.

    Raises ValueError when the notebook has no such cell or a name is not one of its assignments.
    """
    cells = notebook.cells
    index = next((i for i, cell in enumerate(cells) if "parameters" in cell.metadata.get("tags", [])), None)
    if index is None:
        raise ValueError("the notebook has no cell tagged 'parameters' to override")
    known = parameter_names(cells[index].source)
    for name in parameters:
        if name not in known:
            raise ValueError(
                f"unknown notebook parameter {name!r}; the parameters cell sets {', '.join(sorted(known))}"
            )
    lines = ["# injected parameters", *(f"{name} = {value!r}" for name, value in parameters.items())]
    cell = nbformat.v4.new_code_cell("\n".join(lines), metadata={"tags": ["injected-parameters"]})
    cells.insert(index + 1, cell)
    return notebook


def execute(
    notebook: nbformat.NotebookNode,
    parameters: Mapping[str, Any] | None = None,
    cwd: str | os.PathLike = HERE,
    timeout: int = TIMEOUT_S,
) -> nbformat.NotebookNode:
    """Run every cell of ``notebook`` in place in a fresh kernel; a cell that errors raises
    ``nbclient.exceptions.CellExecutionError``."""
    if parameters:
        inject_parameters(notebook, parameters)
    client = NotebookClient(
        notebook,
        km=kernel_manager(),
        timeout=timeout,
        record_timing=False,  # no timestamps in the committed files
        resources={"metadata": {"path": str(cwd)}},
    )
    client.execute(env=kernel_environment())
    return notebook


def write_notebook(notebook: nbformat.NotebookNode, path: str | os.PathLike) -> Path:
    """Validate and write a notebook atomically."""
    nbformat.validate(notebook)
    return atomic_write_text(path, nbformat.writes(notebook) + "\n")


def run(path: str | os.PathLike, parameters: Mapping[str, Any] | None = None, output: str | os.PathLike | None = None):
    """Read the notebook at ``path``, execute it, and write it to ``output`` (if given); returns it."""
    notebook = nbformat.read(path, as_version=4)
    execute(notebook, parameters, cwd=Path(path).resolve().parent)
    if output is not None:
        write_notebook(notebook, output)
    return notebook


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help=f"notebooks to run: {', '.join(NOTEBOOKS)} (default: all)")
    args = parser.parse_args()
    for name in args.names:
        if name not in NOTEBOOKS:
            parser.error(f"unknown notebook {name!r}; choose from {', '.join(NOTEBOOKS)}")
    for name in args.names or NOTEBOOKS:
        start = time.perf_counter()
        run(NOTEBOOKS[name], output=NOTEBOOKS[name])
        size = NOTEBOOKS[name].stat().st_size
        print(f"{name}: ran in {time.perf_counter() - start:.0f} s, {size / 1e6:.2f} MB", file=sys.stderr)


if __name__ == "__main__":
    main()
