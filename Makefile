# The two commands of the README: `make demo` and `make test`. Both install what is missing.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
MVM := $(VENV)/bin/mvm
PYTEST_ARGS ?=

.PHONY: deps apt venv setup demo test test-quick lint bench clean lock

deps: apt venv

apt:
	scripts/install-apt.sh

# Every library (and pip and setuptools themselves) at the version and hashes in deps/python.lock;
# mvm itself editable, with no dependency of its own resolution.
$(VENV)/.installed: pyproject.toml deps/python.lock
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --require-hashes --no-deps -r deps/python.lock
	$(VENV)/bin/pip install -q --no-deps --no-build-isolation -e .
	$(VENV)/bin/pip check
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

# Refresh deps/python.lock from pyproject.toml and deps/build.in (pip-tools' pip-compile, from PyPI only).
lock:
	python3 -m venv build/lock-venv
	build/lock-venv/bin/pip install -q pip-tools
	env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null build/lock-venv/bin/pip-compile -q --upgrade \
	  --generate-hashes --allow-unsafe --strip-extras --extra dev -o deps/python.lock pyproject.toml deps/build.in

clean:
	rm -rf $(VENV) build
