# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# The steps live in tools/dev.py (standard-library Python); Windows runs the same script
# without make (.\make.ps1 demo, make.cmd test), so the set-up tested here is the one
# every platform gets.
PY ?= python3
# CPU build of torch for this machine; CUDA users: see README ("Using a GPU").
TORCH ?= torch==2.13.0
export TORCH
DEV := $(PY) tools/dev.py

.PHONY: demo test test-fast bench fuzz install lint clean

install:
	$(DEV) install

demo:
	$(DEV) demo

# The lint commands (tools/dev.py's LINT list), the web UI's Chromium (Debian packages; needs
# root or sudo, else those tests skip), then the whole suite.
test:
	$(DEV) test

test-fast:
	$(DEV) test-fast

bench:
	$(DEV) bench $(BENCH)

fuzz:
	$(DEV) fuzz

lint:
	$(DEV) lint

clean:
	$(DEV) clean
