# The two commands of the README: `make demo` and `make test`. Both install what is missing.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
MVM := $(VENV)/bin/mvm
PYTEST_ARGS ?=

.PHONY: deps apt venv setup demo test test-quick lint bench clean

deps: apt venv

apt:
	scripts/install-apt.sh

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[dev]'
	touch $@

venv: apt $(VENV)/.installed

# Host assets: default guest kernel + initramfs, built-in flake, offline nixpkgs (when offline).
setup: deps
	$(MVM) setup

demo: setup
	scripts/demo.sh

test: setup
	$(VENV)/bin/pytest -q $(PYTEST_ARGS)

# Without the tests that boot guests, build flakes or create networks.
test-quick: deps
	$(VENV)/bin/pytest -q -m "not guest and not nix and not net" $(PYTEST_ARGS)

lint: deps
	$(VENV)/bin/ruff check src tests tools
	$(VENV)/bin/mypy

bench: setup
	$(PY) tools/bench.py

clean:
	rm -rf $(VENV) build
