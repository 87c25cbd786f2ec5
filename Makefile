# mailroom: the two commands of the README are `make lab` and `make test`; both set up
# everything they need on a fresh Debian machine first.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STACK ?= dev

.PHONY: setup setup-python setup-debian check test lint typecheck unit lab lab-down plan zone render fmt clean

setup: setup-debian setup-python

setup-python: $(VENV)/.installed
$(VENV)/.installed: requirements.txt requirements-dev.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

setup-debian:
	@missing=$$(cat requirements-debian.txt requirements-lab-debian.txt | grep -v '^#'  | xargs -n1 | while read -r p; do \
	  dpkg-query -W -f='$${Status}' "$$p" 2>/dev/null | grep -q 'ok installed' || echo "$$p"; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:" $$missing; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

lint: setup-python
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: setup-python
	$(VENV)/bin/mypy

# The fast loop: lint, types and every test that boots no lab (tests/unit, tests/daemons), about
# two minutes.
check: setup lint typecheck
	$(VENV)/bin/pytest -m "not lab"

unit: setup
	$(VENV)/bin/pytest

# The README's test command: lint, types, and every test, the lab's included.
test: lint typecheck unit

# Offline commands (no cloud account needed).
plan: setup-python
	$(PY) -m infra plan --stack $(STACK)

zone: setup-python
	$(PY) -m infra zone --stack $(STACK)

render: setup-python
	$(PY) -m infra render --stack $(STACK) --out out/$(STACK)

# The README's main command: the real mail stack on a local Debian 12 host, left running.
lab: setup
	$(PY) -m infra lab up --stack $(STACK)

lab-down: setup-python
	$(PY) -m infra lab down

fmt: setup-python
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# What the commands above leave in the tree (the lab's own state is removed by lab-down).
clean:
	rm -rf out .lab-artifacts .pytest_cache .mypy_cache .ruff_cache
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +
