"""The README: its Python example runs as written (on the bundled SmolLM2), its models table is complete."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_example() -> str:
    section = README.read_text(encoding="utf-8").split("## Python: your own task in 15 lines", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_example_is_at_most_15_lines():
    assert len(readme_example().strip().splitlines()) <= 15


@pytest.mark.slow
def test_readme_example_runs_and_writes_its_files(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    exec(compile(readme_example(), str(README), "exec"), {"__name__": "readme"})
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[0].startswith("Baseline(")
    assert -1.5 < float(printed[-1]) < 2.5  # a faithfulness value, not nan
    assert (tmp_path / "capitals.json").stat().st_size > 0
    assert (tmp_path / "capitals.pdf").read_bytes()[:4] == b"%PDF"


def test_the_models_table_names_every_supported_model_type():
    import circuits

    section = README.read_text(encoding="utf-8").split("## Models and the graph", 1)[1].split("\n## ", 1)[0]
    table = "\n".join(line for line in section.splitlines() if line.startswith("|"))
    named = set(re.findall(r"`([a-z0-9_]+)`", table))
    missing = set(circuits.arch.supported_model_types()) - {"circuits-native"} - named
    assert not missing, f"README's models table lacks {sorted(missing)}"


def finer_example() -> str:
    section = README.read_text(encoding="utf-8").split("## Finer circuits: token positions and neurons", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow
def test_the_finer_circuits_example_runs_and_draws_its_figures(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    names: dict = {"__name__": "readme"}
    exec(compile(finer_example(), str(README), "exec"), names)
    assert names["scores"].tensor.shape[2] == 6 and len(names["circuit"]) <= 300
    assert names["neurons"].tensor.shape == (names["model"].graph.n_src, 576)
    assert (tmp_path / "ioi_by_span.png").stat().st_size > 0 and (tmp_path / "top.png").stat().st_size > 0
