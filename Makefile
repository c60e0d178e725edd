# The two commands of the README:  `make demo`  (set up + run the main job)  and  `make test`  (set up + test).
# Both are idempotent: the virtual environment is built once and rebuilt only when pyproject.toml or the lock change.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch is installed first and pinned: 2.13.0 is the CPU wheel on this project's CI machines and the
# CUDA build on PyPI elsewhere; override with `make TORCH_SPEC='torch==X' ...`.
TORCH_SPEC ?= torch==2.13.0
CONFIG ?= platform/experiments/demo.yaml
# Every other package of the development environment, pinned with hashes (`make lock` rewrites it from pyproject.toml;
# Linux x86_64, Python 3.11). torch stays out of it: TORCH_SPEC picks the CPU or CUDA build per machine.
LOCK := requirements/dev.lock

.PHONY: setup demo test lint lock clean

$(BIN)/.installed: pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet --require-hashes --no-deps -r $(LOCK)
	$(BIN)/python -m pip install --quiet --no-deps -e .
	$(BIN)/python -m pip check
	touch $@

setup: $(BIN)/.installed

demo: setup
	$(BIN)/qsmrim demo --config $(CONFIG)

# System pieces the infra tests need (PostgreSQL binaries, checkov in .venv-tools). If they cannot be
# installed (no root, no passwordless sudo) make test stops here and says what to do: a broken install must
# not run a suite whose infra tests would then fail (a test never skips: tests/conftest.py).
test: setup
	@bash .ci/install-system-deps.sh || { \
	  echo "make test: .ci/install-system-deps.sh failed (output above). The infra tests need PostgreSQL server" \
	       "binaries and checkov: run it as root or with passwordless sudo (sudo bash .ci/install-system-deps.sh)," \
	       "or install the postgresql package yourself, then run make test again." >&2; exit 1; }
	$(BIN)/python -m pytest

# Resolve pyproject.toml (runtime + test extra) anew for Python 3.11 with hashes; torch's own dependencies are
# resolved against the CPU wheel where pip finds it (PIP_FIND_LINKS), so no CUDA libraries enter the lock.
lock:  # needs uv, which the dev environment has (test extra)
	$(BIN)/uv pip compile pyproject.toml --extra test --python-version 3.11 --generate-hashes --no-annotate \
		--no-emit-package torch --custom-compile-command "make lock" \
		$${PIP_FIND_LINKS:+--find-links $$PIP_FIND_LINKS} $(LOCK_FLAGS) -o $(LOCK)

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf runs .pytest_cache
