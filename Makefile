# Distillery: the two commands (`make demo`, `make test`) and their helpers.
# Every target installs what it needs, once: the virtualenv (.venv), the project and its pinned
# wheels, and the Kafka jars (.cache/kafka). Re-running is cheap: stamps skip what is done.

PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
# The stamp changes when pyproject.toml does, so a changed pin reinstalls.
STAMP := $(VENV)/.distillery-$(shell sha256sum pyproject.toml | cut -c1-16)

.PHONY: help venv jars models test test-unit test-integration demo up bench chaos protos protos-check clean

help:
	@echo "make demo   - the whole pipeline locally: prompts in, checkpoints out"
	@echo "make test   - unit, integration and end-to-end tests against a real Kafka and Triton"
	@echo "make bench  - throughput, overhead and memory ratios against baselines"
	@echo "make protos - regenerate protos/distillery/v1/*_pb2*.py"

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@rm -f $(VENV)/.distillery-*
	@touch $@

jars: venv
	$(PY) -c 'from services.stack.kafka import ensure_jars; ensure_jars()'

models: venv
	$(VENV)/bin/distill models

test: venv jars
	$(PY) -m pytest $(PYTEST_ARGS)

test-unit: venv
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

test-integration: venv jars
	$(PY) -m pytest tests/integration tests/e2e $(PYTEST_ARGS)

demo: venv jars
	$(VENV)/bin/distill demo

up: venv jars
	$(VENV)/bin/distill up

bench: venv jars
	$(PY) -m bench

chaos: venv jars
	DISTILL_CHAOS=long $(PY) -m pytest tests/chaos $(PYTEST_ARGS)

protos: venv
	$(PY) protos/generate.py

protos-check: venv
	$(PY) protos/generate.py --check

clean:
	rm -rf .distill bench/results .pytest_cache
