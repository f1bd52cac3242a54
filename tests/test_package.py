"""The package as users install and import it: its name, its front door, its layout."""

from __future__ import annotations

import ast
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import circuits

PACKAGE = Path(circuits.__file__).resolve().parent
FRONT_DOOR = ["load_model", "Model", "Graph", "Task", "tasks", "attribute", "acdc", "learn_circuit", "Scores",
              "Circuit", "evaluate", "faithfulness_curve", "roc_auc", "overlap", "patched_forward", "CircuitsError",
              "__version__"]  # fmt: skip


def run_python(code: str, cwd: Path) -> str:
    result = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, check=True)
    return result.stdout.strip()


def test_the_catalogue_imports_as_circuits_tasks_and_nothing_called_tasks_is_installed(tmp_path):
    code = "import importlib.util, circuits.tasks as t; print(t.__name__, importlib.util.find_spec('tasks'))"
    assert run_python(code, tmp_path) == "circuits.tasks None"


def test_the_version_is_the_installed_distributions():
    assert circuits.__version__ == metadata.version("circuits-discovery")
    assert (PACKAGE / "py.typed").is_file()


def test_the_front_door_exports_the_user_api_in_its_documented_order():
    assert circuits.__all__ == FRONT_DOOR
    assert all(hasattr(circuits, name) for name in FRONT_DOOR)


def test_importing_circuits_loads_no_heavy_library(tmp_path):
    heavy = ("pandas", "matplotlib", "networkx", "transformers")
    code = f"import sys, circuits; print([m for m in {heavy!r} if m in sys.modules])"
    assert run_python(code, tmp_path) == "[]"


def module_imports(path: Path) -> set[str]:
    """The package modules a module imports when it is imported (not under TYPE_CHECKING, not in functions)."""
    name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            if base.startswith("circuits"):
                found.add(base)
                found.update(f"{base}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("circuits"))
    return found


def test_package_modules_import_each_other_without_cycles():
    modules = {
        ".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): p
        for p in PACKAGE.rglob("*.py")
    }
    edges = {name: {m for m in module_imports(path) if m in modules and m != name} for name, path in modules.items()}
    # a package imports its children by design; a child importing its package's __init__ is what cycles
    edges = {name: {m for m in targets if not m.startswith(f"{name}.")} for name, targets in edges.items()}

    def cycle_from(start: str, path: list[str]) -> list[str] | None:
        for target in sorted(edges[path[-1]]):
            if target == start:
                return [*path, start]
            if target not in path and len(path) < len(modules):
                found = cycle_from(start, [*path, target])
                if found:
                    return found
        return None

    cycles = [cycle for name in modules if name != "circuits" if (cycle := cycle_from(name, [name]))]
    assert not cycles, " -> ".join(cycles[0])


def test_graph_depends_on_nothing_of_the_package_but_its_error_type():
    assert module_imports(PACKAGE / "graph.py") <= {"circuits.errors", "circuits.errors.CircuitsError"}
