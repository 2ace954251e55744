# Set-up and everyday targets. Everything runs in a local virtualenv ($(VENV)).
# CPU torch is installed first and then pinned by a constraint, so that no later install can pull
# a CUDA build of torch (several GB) as a dependency.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
PYTEST_ARGS ?= -n 2

CHROMIUM ?= /usr/bin/chromium

.PHONY: setup test test-fast serve clean

setup: $(VENV)/.installed $(CHROMIUM)

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==$(TORCH_VERSION) numpy  # numpy first: torch warns on import without it
	$(PY) -c "import torch; print('torch==' + torch.__version__)" > $(VENV)/constraints.txt
	$(PY) -m pip install -q -c $(VENV)/constraints.txt -e '.[server,test,triton]'
	touch $@

## Debian's chromium, for the dashboard test in a real headless browser (which skips without it).
$(CHROMIUM):
	-if command -v apt-get >/dev/null; then \
		apt-get install -y -q chromium >/dev/null || (apt-get update -q && apt-get install -y -q chromium >/dev/null); \
	fi

## The whole test suite.
test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

## The core unit tests only (no model).
test-fast: setup
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

## Serve the bundled default model (pagedserve/tiny-py) with the OpenAI API on 127.0.0.1:8000.
serve: setup
	$(VENV)/bin/pagedserve serve

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
