# Two commands: `make demo` (the whole pipeline on the tiny preset) and `make test` (the test suite).
VENV ?= .venv
PY := $(VENV)/bin/python
# A CPU build of torch unless one is already installed: GPU users install their CUDA torch into $(VENV) first.
TORCH_SPEC ?= torch==2.13.0
DEMO_OUT ?= outputs/demo
PYTEST_ARGS ?=
# Optional extras to install with the project (CI adds deepspeed so the ZeRO-2 test runs rather than skips).
EXTRAS ?= dev

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
	$(PY) -m pip install -q -e '.[$(EXTRAS)]'
	touch $@

# The whole pipeline on the tiny preset, each step the command a user would run: zoo check, dataset build (sample
# images + frame pairs), training, generation with the trained adapter, an alpha/layer sweep, evaluation.
SHARED_DATA ?= $(or $(MPALIGN_SHARED_DATA),../shared/data)
DEMO_BENCH = $(if $(wildcard $(SHARED_DATA)/msbench/msbench_meta.json),msbench,$(DEMO_OUT)/sample-bench.jsonl)
demo: install
	$(PY) -m mpalign.zoo_summary
	$(PY) pipelines/build_dataset.py --output $(DEMO_OUT)/dataset
	$(PY) -m mpalign.train --overwrite --set data.path=$(DEMO_OUT)/dataset --set train.output_dir=$(DEMO_OUT)/train
	$(PY) -m mpalign.generate --adapter $(DEMO_OUT)/train/adapter --out $(DEMO_OUT)/generated.png \
	  --prompt "a red ball and a striped blue cube on grass" \
	  --subject outputs/sample-input/images/img-0001.png --box 0.05,0.3,0.45,0.7 --phrase ball \
	  --subject outputs/sample-input/images/img-0002.png --box 0.55,0.3,0.95,0.7 --phrase cube
	$(PY) tune/sweep_alpha.py --overwrite --set data.path=$(DEMO_OUT)/dataset --set tune.output_dir=$(DEMO_OUT)/tune
	$(PY) -m mpalign.sample_data --benchmark $(DEMO_OUT)/sample-bench.jsonl
	$(PY) -m mpalign.evaluate --benchmark $(DEMO_BENCH) --adapter $(DEMO_OUT)/train/adapter --out $(DEMO_OUT)/eval --limit 4
	@echo "demo finished: dataset, adapter, sweep and report under $(DEMO_OUT)"

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check mpalign pipelines tune benchmarks tests

clean:
	rm -rf outputs .pytest_cache
