"""The notebooks run top to bottom without an error (on fewer examples), and are committed with their outputs."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_BYTES = 1_500_000


def _load_runner():
    spec = importlib.util.spec_from_file_location("notebook_runner", ROOT / "notebooks" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


runner = _load_runner()

# Settings that shrink each notebook for the test suite (the committed outputs use the notebooks' own).
SMALL = {
    "quickstart": {},
    "ioi_walkthrough": {"N": 8, "IG_STEPS": 2, "ACDC_CANDIDATES": 40, "CURVE_FRACTIONS": (0.01, 0.1, 1.0)},
}


def _code_cells(notebook: nbformat.NotebookNode) -> list[nbformat.NotebookNode]:
    return [cell for cell in notebook.cells if cell.cell_type == "code"]


def _errors(notebook: nbformat.NotebookNode) -> list[str]:
    return [
        f"{output.ename}: {output.evalue}"
        for cell in _code_cells(notebook)
        for output in cell.get("outputs", [])
        if output.output_type == "error"
    ]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(runner.NOTEBOOKS))
def test_notebook_runs_without_errors_and_leaves_the_committed_file_alone(name, tmp_path):
    path = runner.NOTEBOOKS[name]
    committed = path.read_bytes()
    notebook = nbformat.read(path, as_version=4)
    runner.execute(notebook, SMALL[name], cwd=tmp_path)  # raises CellExecutionError if a cell fails
    assert _errors(notebook) == []
    assert all(cell.execution_count is not None for cell in _code_cells(notebook))
    assert path.read_bytes() == committed


@pytest.mark.slow
def test_notebook_kernel_is_the_interpreter_running_the_tests(tmp_path):
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("import sys\nprint(sys.executable)")])
    runner.execute(notebook, cwd=tmp_path)
    assert notebook.cells[0].outputs[0].text.strip() == sys.executable


@pytest.mark.parametrize("name", list(runner.NOTEBOOKS))
def test_committed_notebook_carries_the_outputs_of_a_clean_run(name):
    path = runner.NOTEBOOKS[name]
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    cells = _code_cells(notebook)
    assert [cell.execution_count for cell in cells] == list(range(1, len(cells) + 1))
    assert _errors(notebook) == []
    assert not any("injected-parameters" in cell.metadata.get("tags", []) for cell in notebook.cells)
    assert any("image/png" in output.get("data", {}) for cell in cells for output in cell.outputs)
    assert path.stat().st_size < MAX_BYTES


def test_ioi_walkthrough_declares_its_settings_in_a_parameters_cell():
    notebook = nbformat.read(runner.NOTEBOOKS["ioi_walkthrough"], as_version=4)
    tagged = [cell for cell in notebook.cells if "parameters" in cell.metadata.get("tags", [])]
    assert len(tagged) == 1
    assert set(SMALL["ioi_walkthrough"]) <= runner.parameter_names(tagged[0].source)


def test_injected_parameters_follow_the_parameters_cell():
    notebook = nbformat.v4.new_notebook(
        cells=[
            nbformat.v4.new_markdown_cell("# title"),
            nbformat.v4.new_code_cell("N = 32\nSTEPS: int = 5", metadata={"tags": ["parameters"]}),
            nbformat.v4.new_code_cell("print(N)"),
        ]
    )
    runner.inject_parameters(notebook, {"N": 8, "STEPS": 2})
    injected = notebook.cells[2]
    assert injected.metadata["tags"] == ["injected-parameters"]
    assert injected.source == "# injected parameters\nN = 8\nSTEPS = 2"
    assert notebook.cells[3].source == "print(N)"


def test_injecting_an_unknown_parameter_raises():
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("N = 32", metadata={"tags": ["parameters"]})])
    with pytest.raises(ValueError, match="unknown notebook parameter 'M'"):
        runner.inject_parameters(notebook, {"M": 1})


def test_injecting_into_a_notebook_without_a_parameters_cell_raises():
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("N = 32")])
    with pytest.raises(ValueError, match="no cell tagged 'parameters'"):
        runner.inject_parameters(notebook, {"N": 8})
