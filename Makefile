# Development tasks. Needs only Python 3.11+ (PYTHON, default python3): everything else is installed
# into .venv, which is created on first use and reinstalled only when pyproject.toml changes.
#
#   make demo        the example shop on SQLite, end to end (well under a minute)
#   make test        the whole suite against PostgreSQL, MariaDB and SQLite (PYTEST_ARGS="-k ordering -x"),
#                    two tests at a time (TEST_WORKERS=0: one at a time)
#   make lint        ruff check + ruff format --check
#   make typecheck   mypy --strict on the packages
#   make docs        the documentation site (MkDocs + Material) into site/, strict: a broken link fails it
#   make kafka-example  the Kafka example end to end on a local test broker (installs only what it needs)
#   make bench       the benchmark suite, peers included (~30-40 min; results in bench/results/, see BENCHMARKS.md)
#   make bench-quick the benchmark's two-minute subset (results in bench/results/quick/)
#   make bench-web   every dashboard page on 5,000,000 delivered + 100,000 waiting messages (PostgreSQL, MariaDB)
#   make clean       remove .venv, caches, build output, site/ and demo-output/

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=
# tests run side by side (pytest-xdist): most of their time is spent waiting on relays, brokers and
# leases, and each has a database of its own; two halve the suite's time on a 2-core machine
TEST_WORKERS ?= 2
PACKAGES := outbox relay consumers
LINT_PATHS := $(PACKAGES) tests examples bench tools
PIP := $(BIN)/python -m pip -qq --disable-pip-version-check --no-input

.DEFAULT_GOAL := help
.PHONY: help demo test lint typecheck docs kafka-example clean bench bench-quick bench-web

help:
	@sed -n 's/^#   //p' Makefile

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "error: $(PYTHON) is $$($(PYTHON) --version 2>&1); Python 3.11 or newer is needed (make PYTHON=python3.12 ...)" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)

# pip -qq prints errors only. The stamp files record what was installed: make redoes an install when
# pyproject.toml is newer than its stamp.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	@echo "installing the project into $(VENV) ..."
	$(PIP) install -e .
	@touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	@echo "installing the project and its dev tools into $(VENV) ..."
	$(PIP) install -e '.[dev]'
	@touch $(VENV)/.installed $(VENV)/.installed-docs $(VENV)/.installed-kafka-example $@

$(VENV)/.installed-bench: pyproject.toml | $(BIN)/python
	@echo "installing the project, its dev tools and the benchmark's peers into $(VENV) ..."
	$(PIP) install -e '.[dev,bench]'
	@touch $(VENV)/.installed $(VENV)/.installed-dev $(VENV)/.installed-docs $(VENV)/.installed-kafka-example $@

$(VENV)/.installed-docs: pyproject.toml | $(BIN)/python
	@echo "installing the project and the documentation tools into $(VENV) ..."
	$(PIP) install -e '.[docs]'
	@touch $(VENV)/.installed $@

$(VENV)/.installed-kafka-example: pyproject.toml | $(BIN)/python
	@echo "installing the project and the Kafka-protocol test broker into $(VENV) ..."
	$(PIP) install -e '.[kafka-example]'
	@touch $(VENV)/.installed $@

demo: $(VENV)/.installed
	$(BIN)/python examples/demo.py

# tests/test_browser.py drives Debian's chromium with Playwright (the browsers Playwright downloads by
# itself cannot be fetched here): installed with apt-get when missing; CHROMIUM=/path uses another one.
CHROMIUM ?= /usr/bin/chromium
$(CHROMIUM):
	@command -v apt-get >/dev/null || { echo "error: the browser tests need Chromium: install it, or give its path as CHROMIUM=/path/to/chromium" >&2; exit 1; }
	@echo "installing Debian's chromium for the browser tests ..."
	@DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null 2>&1 || \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

# pytest's exit code 5 means "no tests collected": that is a failure here too (make fails on any non-zero).
test: $(VENV)/.installed-dev $(CHROMIUM)
	@OUTBOX_TEST_CHROMIUM=$(CHROMIUM) $(BIN)/pytest -n $(TEST_WORKERS) $(PYTEST_ARGS); code=$$?; \
		if [ $$code -eq 5 ]; then echo "error: pytest collected no tests" >&2; fi; \
		exit $$code

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/ruff format --check $(LINT_PATHS)

typecheck: $(VENV)/.installed-dev
	$(BIN)/mypy --strict $(addprefix -p ,$(PACKAGES))

# NO_MKDOCS_2_WARNING: Material's banner about its successor, printed on every build (not a build warning).
docs: $(VENV)/.installed-docs
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

# The example of docs/kafka.md: KAFKA_EXAMPLE_ARGS="--bootstrap HOST:PORT" uses a real cluster instead.
KAFKA_EXAMPLE_ARGS ?=
kafka-example: $(VENV)/.installed-kafka-example
	$(BIN)/python -m examples.kafka.run $(KAFKA_EXAMPLE_ARGS)

# Never part of `make test` (too slow, too noisy); tests/test_bench_smoke.py checks that it runs. BENCH_ARGS
# adds options, e.g. make bench BENCH_ARGS="--only drain peers --runs 5".
BENCH_ARGS ?=
bench: $(VENV)/.installed-bench
	$(BIN)/python -m bench $(BENCH_ARGS)

bench-quick: $(VENV)/.installed-bench
	$(BIN)/python -m bench --quick $(BENCH_ARGS)

# loads a database named webbench on each server (about a minute each; kept for WEB_BENCH_ARGS=--keep)
WEB_BENCH_ARGS ?=
bench-web: $(VENV)/.installed-dev
	$(BIN)/python -m bench.web_pages --db postgresql $(WEB_BENCH_ARGS)
	$(BIN)/python -m bench.web_pages --db mariadb $(WEB_BENCH_ARGS)

clean:
	rm -rf $(VENV) build dist *.egg-info site demo-output .pytest_cache .mypy_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
