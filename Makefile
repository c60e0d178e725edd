# The two commands of the README:  `make demo`  (set up + run the main job)  and  `make test`  (set up + test).
# Both are idempotent: the virtual environment is built once and rebuilt only when pyproject.toml changes.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch is installed first and pinned: 2.13.0 is the CPU wheel on this project's CI machines and the
# CUDA build on PyPI elsewhere; override with `make TORCH_SPEC='torch==X' ...`.
TORCH_SPEC ?= torch==2.13.0
CONFIG ?= platform/experiments/demo.yaml

.PHONY: setup demo test lint clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

setup: $(BIN)/.installed

demo: setup
	$(BIN)/qsmrim demo --config $(CONFIG)

# System pieces the infra tests need (PostgreSQL binaries, checkov in .venv-tools); a machine where they
# cannot be installed still runs the suite, and those tests say what is missing.
test: setup
	bash .ci/install-system-deps.sh || echo "warning: .ci/install-system-deps.sh failed; infra tests may skip or fail"
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf runs .pytest_cache
