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

.PHONY: train test test-fast prepare lint clean

$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c requirements.lock -e '.[dev]'
	touch $(STAMP)

## Prepare the embedded default corpus (Python standard library sources) and its tokenizer;
## PREPARE_ARGS: overrides, e.g. PREPARE_ARGS='data=hub-stream data.hub_name=roneneldan/TinyStories'.
prepare: $(STAMP)
	$(BIN)/python -m trainer.prepare $(PREPARE_ARGS)

## Train a small GPT on 2 CPU ranks through the deepspeed launcher; prints where the results are.
train: prepare
	PATH=$(CURDIR)/$(BIN):$$PATH launch/local.sh 2 experiment=quickstart $(ARGS)

## The whole test suite, slow multi-process tests included (what CI runs).
test: $(STAMP)
	$(BIN)/python -m pytest $(ARGS)

## The suite without the slow launcher matrix, for quick local iterations.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check trainer tests benchmarks

clean:
	rm -rf $(VENV) runs multirun outputs data/cache
