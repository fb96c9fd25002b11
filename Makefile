# Set-up and checks. Everything installs into ./.venv: the import name `poetry` would clash with the packaging tool
# Poetry in a shared environment.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
DATA ?= data/sample/train-data
export HF_HUB_OFFLINE ?= 1
export HF_HUB_DISABLE_PROGRESS_BARS ?= 1
export TQDM_DISABLE ?= 1

.PHONY: install install-demo test test-slow demo clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# torch first and pinned: it is a CPU wheel on local disk, while an unpinned torch pulls a multi-GB CUDA build
$(VENV)/.torch: | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==$(TORCH_VERSION)
	touch $@

$(VENV)/.installed: setup.cfg pyproject.toml $(VENV)/.torch
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

$(VENV)/.installed-demo: setup.cfg pyproject.toml $(VENV)/.installed
	$(BIN)/python -m pip install -q -e '.[dev,demo]'
	touch $@

install: $(VENV)/.installed
install-demo: $(VENV)/.installed-demo

test: install
	$(BIN)/python -m pytest -q

test-slow: install-demo
	$(BIN)/python -m pytest -q -m slow

clean:
	rm -rf $(VENV) runs
