# skinlesion — fresh machine: `make run` and `make test`. See README.md.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
STORE ?= file://$(CURDIR)/store
RUN_ID ?= local
PRESET ?= cpu
BENCH_JSON ?= build/bench.json
PYTEST_ARGS ?=

# Kubernetes (users' machines; need docker, kind, helm, kubectl).
IMAGE ?= skinlesion
TAG ?= $(shell git rev-parse --short HEAD 2>/dev/null || echo dev)
KIND_CLUSTER ?= skinlesion
NAMESPACE ?= skinlesion
RELEASE ?= skinlesion
VALUES ?= charts/skinlesion/values-kind.yaml

.PHONY: help setup setup-dev run test check lint fmt bench image image-gpu kind-up deploy kind-test clean

help:
	@echo "make run      set up .venv and run the whole pipeline locally (synthetic data)"
	@echo "make test     set up .venv with dev tools and run every test"
	@echo "make check    ruff, mypy and the fast tests"
	@echo "make bench    benchmarks -> $(BENCH_JSON)"
	@echo "make image | kind-up | deploy | kind-test   Kubernetes (needs docker, kind, helm)"

$(VENV)/.runtime: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.dev: $(VENV)/.runtime
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

setup: $(VENV)/.runtime
setup-dev: $(VENV)/.dev

run: setup
	$(BIN)/skinlesion run --store $(STORE) --run-id $(RUN_ID) --preset $(PRESET)

test: setup-dev
	$(PY) -m pytest $(PYTEST_ARGS)

lint: setup-dev
	$(BIN)/ruff check skinlesion jobs tests
	$(BIN)/ruff format --check skinlesion jobs tests
	$(BIN)/mypy

fmt: setup-dev
	$(BIN)/ruff format skinlesion jobs tests
	$(BIN)/ruff check --fix skinlesion jobs tests

check: lint
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

bench: setup-dev
	BENCH_JSON=$(BENCH_JSON) $(PY) -m tests.bench

clean:
	rm -rf build store .pytest_cache .mypy_cache .ruff_cache
