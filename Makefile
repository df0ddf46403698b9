# make demo : install what is missing, then run a one-shot chat on the bundled example image
# make test : install the test dependencies, then run the whole test suite
SHELL := /bin/bash
PY ?= python3
VENV ?= .venv
PYTHON := $(VENV)/bin/python
DEMO_MODEL ?= build/demo-random-cogvlm
DEMO_IMAGE ?= assets/demo.png
DEMO_QUERY ?= What is in the image?

.PHONY: install install-dev chromium demo test bench tiny-models clean

$(VENV)/.core: requirements.txt
	@test -x $(PYTHON) || $(PY) -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	@# No CUDA here: the CPU wheel of torch (a bare `torch` pulls a multi-GB CUDA build).
	@if command -v nvidia-smi >/dev/null 2>&1; then $(PYTHON) -m pip install -q torch; \
	 else $(PYTHON) -m pip install -q torch==2.13.0; fi
	$(PYTHON) -m pip install -q -r requirements.txt
	@touch $@

$(VENV)/.dev: $(VENV)/.core requirements-dev.txt
	$(PYTHON) -m pip install -q -r requirements-dev.txt
	@touch $@

# The browser tests drive Debian's chromium (no Playwright browser download).
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; elif command -v sudo >/dev/null 2>&1; then SUDO=sudo; \
	  else echo "chromium is missing: install it with apt-get install chromium fonts-dejavu-core"; exit 1; fi; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  $$SUDO apt-get install -y -q chromium fonts-dejavu-core >/dev/null 2>&1 || \
	  { $$SUDO apt-get update -q >/dev/null && $$SUDO apt-get install -y -q chromium fonts-dejavu-core >/dev/null; }; }

install: $(VENV)/.core
install-dev: $(VENV)/.dev

$(DEMO_MODEL)/latest: | $(VENV)/.core
	$(PYTHON) utils/create_test_model.py --config tiny-test-cogvlm --out $(DEMO_MODEL) --overwrite

demo: $(VENV)/.core $(DEMO_MODEL)/latest
	$(PYTHON) basic_demo/cli_demo_sat.py --from_pretrained $(DEMO_MODEL) \
	    --image $(DEMO_IMAGE) --query "$(DEMO_QUERY)" --max_new_tokens 24

test: $(VENV)/.dev chromium
	$(PYTHON) -m pytest

bench: $(VENV)/.core
	$(PYTHON) bench/decode.py --json bench/results_decode.json
	$(PYTHON) bench/batch.py --json bench/results_batch.json
	$(PYTHON) bench/quant.py --json bench/results_quant.json
	$(PYTHON) bench/finetune.py --json bench/results_finetune.json
	$(PYTHON) bench/tp.py --json bench/results_tp.json

# The bundled demo models (checkpoints/tiny-cogvlm, checkpoints/tiny-cogagent): synthetic data,
# tokenizer, full-parameter training with finetune_demo/, export, evaluation. Resumable.
TINY_STEPS ?= 1500
tiny-models: $(VENV)/.core
	$(PYTHON) utils/train_tiny_models.py --which cogvlm --steps $(TINY_STEPS) --batch_size 8
	$(PYTHON) utils/train_tiny_models.py --which cogagent --steps $(TINY_STEPS) --batch_size 8

clean:
	rm -rf $(VENV) build .pytest_cache
