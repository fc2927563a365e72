# The README's two commands: `make train` and `make test`. Everything else here serves them.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Hub look-ups must never block a run: everything the project reads is local. HUB_OFFLINE=0 lets
# data=hub-stream reach the hub where the network allows (make prepare PREPARE_ARGS='data=hub-stream ...').
HUB_OFFLINE ?= 1
export HF_HUB_OFFLINE := $(HUB_OFFLINE)
export HF_DATASETS_OFFLINE := $(HUB_OFFLINE)
export TRANSFORMERS_OFFLINE := 1

.PHONY: train test test-fast prepare lint clean gpu-venv

$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c requirements.lock -e '.[dev]'
	touch $(STAMP)

## The same venv on a GPU machine: the pinned torch version's CUDA build first (PyPI's Linux wheel is built
## with CUDA and brings its CUDA libraries; TORCH_INDEX picks another index, e.g. https://download.pytorch.org/whl/cu128),
## then everything else as for `make test`. Fails unless torch then sees a GPU.
TORCH_PIN   := $(shell sed -n 's/.*"torch==\([^"]*\)".*/\1/p' pyproject.toml)
TORCH_INDEX ?= https://pypi.org/simple
gpu-venv:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check --force-reinstall --index-url $(TORCH_INDEX) \
		-c requirements.lock "torch==$(TORCH_PIN)"
	$(BIN)/pip install --quiet --disable-pip-version-check -c requirements.lock -e '.[dev]'
	touch $(STAMP)
	$(BIN)/python -c "import torch; assert torch.cuda.is_available(), 'torch ' + torch.__version__ + ' sees no GPU'; \
		print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name(0))"

## Prepare the embedded default corpus (Python standard library sources) and its tokenizer;
## PREPARE_ARGS: overrides, e.g. PREPARE_ARGS='data=hub-stream data.hub_name=roneneldan/TinyStories'.
prepare: $(STAMP)
	$(BIN)/python -m trainer.prepare $(PREPARE_ARGS)

## Train a small GPT on 2 CPU ranks through the deepspeed launcher; prints where the results are.
train: prepare
	PATH=$(CURDIR)/$(BIN):$$PATH launch/local.sh 2 experiment=quickstart $(ARGS)

## The whole test suite, slow multi-process tests included (what CI runs), on TEST_WORKERS pytest-xdist
## workers. Two suit a 2-core machine: the launcher tests wait on process start-up and collectives much of
## the time, and each already starts 2-4 ranks (measured: 21 min against 27 in one process; handing out
## whole files instead, --dist loadfile, left one long file for the end: 23 min). TEST_WORKERS=0 runs in
## this process.
TEST_WORKERS ?= 2
PYTEST := $(BIN)/python -m pytest -n $(TEST_WORKERS)
test: $(STAMP)
	$(PYTEST) $(ARGS)

## The suite without the slow launcher matrix, for quick local iterations.
test-fast: $(STAMP)
	$(PYTEST) -m "not slow" $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check trainer tests benchmarks

clean:
	rm -rf $(VENV) runs multirun outputs data/cache
