# Two commands: `make demo` (the whole pipeline in the toy world) and `make test` (the test suite).
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

# Quiet (-qq: errors only), so that `make demo` on a fresh clone stays a screen of meaningful lines.
$(VENV)/.installed: pyproject.toml
	@echo "installing mpalign[$(EXTRAS)] into $(VENV) (minutes the first time)"
	@test -x $(PY) || python3 -m venv $(VENV)
	@$(PY) -m pip install -qq --upgrade pip
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -qq "$(TORCH_SPEC)"
	@$(PY) -m pip install -qq -e '.[$(EXTRAS)]'
	@touch $@

# The whole pipeline in the toy world (configs/toy.yaml: small models trained by the project, shipped in
# mpalign/toy/weights), each step the command a user would run: zoo check, dataset build (procedural images + frame
# pairs, captions that name only each object's kind), training, generation from two held-out references (with a
# sheet: references | layout | image), a sweep ranked by identity (colour), evaluation on the toy benchmark. Then MOSAIC
# (model.method=mosaic, docs/mosaic.md) on the toy FLUX: a small dataset with correspondences, a short training of its
# reference LoRA with SCAL and MDL, one image from the same two references, evaluation on the toy benchmark.
# The commands are not echoed (@): each prints what it does, and the whole demo stays under 100 console lines
# (issue 14); `make -n demo` lists them.
TOY = --config configs/toy.yaml
MOSAIC = --config configs/toy-mosaic.yaml
demo: install
	@$(PY) -m mpalign.zoo_summary $(TOY)
	@$(PY) pipelines/build_dataset.py $(TOY) --output $(DEMO_OUT)/dataset
	@$(PY) -m mpalign.train $(TOY) --overwrite --set data.path=$(DEMO_OUT)/dataset --set train.output_dir=$(DEMO_OUT)/train
	@$(PY) -m mpalign.toy.benchmark $(DEMO_OUT)/references
	@$(PY) -m mpalign.generate $(TOY) --adapter $(DEMO_OUT)/train/adapter --out $(DEMO_OUT)/generated.png \
	  --prompt "a ball and a ring on grass" --steps 20 --guidance-scale 4 \
	  --subject $(DEMO_OUT)/references/ball.png --box 0.05,0.3,0.45,0.7 --phrase ball \
	  --subject $(DEMO_OUT)/references/ring.png --box 0.55,0.3,0.95,0.7 --phrase ring
	@$(PY) tune/sweep_alpha.py $(TOY) --overwrite --set data.path=$(DEMO_OUT)/dataset --set tune.output_dir=$(DEMO_OUT)/tune \
	  --set train.max_steps=200 --set train.warmup_steps=100 --set train.val_every=100
	@$(PY) -m mpalign.evaluate $(TOY) --benchmark toy --adapter $(DEMO_OUT)/train/adapter --out $(DEMO_OUT)/eval --limit 16
	@echo "MOSAIC (model.method=mosaic) on the toy FLUX:"
	@$(PY) pipelines/build_dataset.py $(MOSAIC) --output $(DEMO_OUT)/mosaic/dataset \
	  --set data.sample.num_images=400 --set data.sample.num_videos=50
	@$(PY) -m mpalign.train $(MOSAIC) --overwrite --set data.path=$(DEMO_OUT)/mosaic/dataset \
	  --set train.output_dir=$(DEMO_OUT)/mosaic/train --set train.max_steps=500 --set train.warmup_steps=250 \
	  --set train.val_every=500 --set train.log_every=500
	@$(PY) -m mpalign.generate $(MOSAIC) --adapter $(DEMO_OUT)/mosaic/train/adapter --out $(DEMO_OUT)/mosaic/generated.png \
	  --prompt "a ball and a ring on grass" --steps 20 \
	  --subject $(DEMO_OUT)/references/ball.png --phrase ball --subject $(DEMO_OUT)/references/ring.png --phrase ring
	@$(PY) -m mpalign.evaluate $(MOSAIC) --benchmark toy --adapter $(DEMO_OUT)/mosaic/train/adapter --out $(DEMO_OUT)/mosaic/eval --limit 16
	@echo "demo finished: dataset, adapter, $(DEMO_OUT)/generated.sheet.png, sweep and report under $(DEMO_OUT); MOSAIC's under $(DEMO_OUT)/mosaic"

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check mpalign pipelines tune benchmarks tests

clean:
	rm -rf outputs .pytest_cache
