# Two commands: `make demo` (the whole pipeline on the tiny preset) and `make test` (the test suite).
VENV ?= .venv
PY := $(VENV)/bin/python
# A CPU build of torch unless one is already installed: GPU users install their CUDA torch into $(VENV) first.
TORCH_SPEC ?= torch==2.13.0
DEMO_OUT ?= outputs/demo
PYTEST_ARGS ?=

export RAY_AUTH_MODE ?= disabled
export RAY_USAGE_STATS_ENABLED ?= 0
export TRANSFORMERS_VERBOSITY ?= error
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install demo test test-fast lint clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

demo: install
	$(PY) -m mpalign.zoo_summary
	@echo "demo finished: outputs under $(DEMO_OUT)"

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check mpalign pipelines tune benchmarks tests

clean:
	rm -rf outputs .pytest_cache
