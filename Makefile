# Set-up and everyday targets. Everything runs in a local virtualenv ($(VENV)).
# CPU torch is installed first and then pinned by a constraint, so that no later install can pull
# a CUDA build of torch (several GB) as a dependency.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
PYTEST_ARGS ?= -n 2

.PHONY: setup test test-fast run clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -c "import torch; print('torch==' + torch.__version__)" > $(VENV)/constraints.txt
	$(PY) -m pip install -q -c $(VENV)/constraints.txt -e '.[server,test,triton]'
	touch $@

## The whole test suite.
test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

## The core unit tests only (no model).
test-fast: setup
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

## Build a tiny random Llama with a locally trained tokenizer and generate from it.
run: setup
	$(PY) scripts/make_tiny_model.py .tiny-model
	$(VENV)/bin/pagedserve generate --model .tiny-model --max-tokens 32 "def fibonacci(n):"

clean:
	rm -rf $(VENV) .tiny-model .pytest_cache .hypothesis
