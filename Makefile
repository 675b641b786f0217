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

.PHONY: help setup setup-dev pushgateway docker-deps pods-test lock schema run test soak check lint fmt bench gpu-bench image image-gpu docker-engine base-image \
	kind-up deploy kind-test clean

help:
	@echo "make run      set up .venv and run the whole pipeline locally (synthetic data)"
	@echo "make test     set up .venv with dev tools and run every test"
	@echo "make soak     the long fault matrices (every kill point), under 30 minutes"
	@echo "make check    ruff, mypy, import contracts and the fast tests"
	@echo "make bench    benchmarks -> $(BENCH_JSON)"
	@echo "make gpu-bench  ResNet152 fine-tune images/s on one GPU -> $(GPU_BENCH_JSON)"
	@echo "make schema   regenerate the chart parts that mirror the code (schema, stage list)"
	@echo "make image | kind-up | deploy | kind-test   Kubernetes (needs docker, kind, helm)"
	@echo "make pods-test   the chart's Jobs run as containers of the built image (Docker engine)"

# Every install takes its versions from the lock file (constraints.txt), as the image does:
# the result does not depend on the day it runs. `make lock` regenerates it.
PIP_INSTALL = $(PY) -m pip install -q --disable-pip-version-check -c constraints.txt

$(VENV)/.runtime: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) -e .
	touch $@

$(VENV)/.dev: $(VENV)/.runtime
	$(PIP_INSTALL) -e '.[dev]'
	touch $@

# Regenerate the lock from the current .venv (after changing pyproject's dependencies,
# `pip install` the new versions into .venv, then run this; the GPU section needs the index).
lock: setup-dev
	$(PY) -m tests.lockfile

# The chart's values schema (pipeline and stages parts) and templates/_stages.tpl, generated
# from skinlesion/config.py and skinlesion/stages.py; tests/test_chart.py fails when stale.
schema: setup-dev
	$(PY) -m tests.chart_schema

setup: $(VENV)/.runtime
setup-dev: $(VENV)/.dev

run: setup
	$(BIN)/skinlesion run --store $(STORE) --run-id $(RUN_ID) --preset $(PRESET)

# The observability tests run a real Pushgateway (Debian package prometheus-pushgateway).
pushgateway:
	@command -v prometheus-pushgateway >/dev/null || test -x /usr/bin/prometheus-pushgateway || \
	  { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	    apt-get install -y prometheus-pushgateway >/dev/null; } || \
	  echo "tests/test_obs.py needs prometheus-pushgateway: apt-get install -y prometheus-pushgateway" \
	    "(or put the binary from github.com/prometheus/pushgateway releases on PATH)"

# The image and pods tests (tests/test_image.py, tests/test_pods.py, marker `pods`) build the
# image with `make image` and run the chart's Jobs in it: they need Debian's Docker engine and
# debootstrap, installed here when apt is usable (the tests start the engine and build the
# base themselves); elsewhere they fail saying what to install.
docker-deps:
	@{ command -v dockerd && command -v debootstrap; } >/dev/null || \
	  { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	    { DEBIAN_FRONTEND=noninteractive apt-get install -y docker.io debootstrap >/dev/null || \
	      { apt-get update >/dev/null && \
	        DEBIAN_FRONTEND=noninteractive apt-get install -y docker.io debootstrap >/dev/null; }; }; } || \
	  echo "tests/test_image.py and tests/test_pods.py need Docker's engine and debootstrap:" \
	    "apt-get install -y docker.io debootstrap (as root)"

# Two workers: most tests wait on a child process or a server about half the time. A
# module is one unit of work (its fixtures are built once); tests/conftest.py schedules.
TEST_WORKERS ?= 2
XDIST = -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder
test: setup-dev pushgateway docker-deps
	$(PY) -m pytest -m "not soak" $(XDIST) --durations=15 $(PYTEST_ARGS)

# The long fault matrices: every test of these files, the `soak`-marked ones (which
# `make test` leaves out) and the few that `make test` runs as well.
SOAK_TESTS ?= tests/test_kill_matrix.py tests/test_controller.py::test_concurrent_runs_get_their_own_jobs_and_results
soak: setup-dev
	$(PY) -m pytest --durations=30 $(SOAK_TESTS) $(PYTEST_ARGS)

lint: setup-dev
	$(BIN)/ruff check skinlesion jobs tests
	$(BIN)/ruff format --check skinlesion jobs tests
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache

fmt: setup-dev
	$(BIN)/ruff format skinlesion jobs tests
	$(BIN)/ruff check --fix skinlesion jobs tests

check: lint
	$(PY) -m pytest -m "not slow and not soak" $(XDIST) $(PYTEST_ARGS)

# Only the tests that run the chart's Jobs as containers (builds the image first, cached).
pods-test: setup-dev docker-deps
	$(PY) -m pytest -m pods --durations=0 $(PYTEST_ARGS)

bench: setup-dev
	BENCH_JSON=$(BENCH_JSON) $(PY) -m tests.bench

# ResNet152 fine-tune images/s on one GPU (fails without one): table last, JSON in
# $(GPU_BENCH_JSON). Under 8 minutes (a time budget skips what does not fit).
GPU_BENCH_JSON ?= build/gpu-bench.json
gpu-bench: setup-dev
	GPU_BENCH_JSON=$(GPU_BENCH_JSON) $(PY) -m tests.bench.gpu_bench

clean:
	rm -rf build store .pytest_cache .mypy_cache .ruff_cache

# --- Kubernetes: image, kind cluster, deploy (users' machines: docker, kind, helm, kubectl) --
# The kind store settings below must match charts/skinlesion/values-kind.yaml (store.*);
# tests/test_chart.py checks it and renders the chart with every values file used here.
KIND_BUCKET ?= skinlesion
KIND_PREFIX ?= kind
KIND_S3_SECRET ?= skinlesion-s3
KIND_S3_USER ?= skinlesion
KIND_S3_PASSWORD ?= skinlesion-kind-only
KIND_S3_PORT ?= 19000
KIND_IMAGES ?= 1500
KIND_TIMEOUT_S ?= 7200
KIND_KUBECTL = kubectl --context kind-$(KIND_CLUSTER) -n $(NAMESPACE)
KIND_HELM = helm --kube-context kind-$(KIND_CLUSTER)
HELM_SET_IMAGE = --set image.repository=$(IMAGE) --set image.tag=$(TAG)
KIND_S3_ENV = AWS_ENDPOINT_URL=http://127.0.0.1:$(KIND_S3_PORT) AWS_REGION=us-east-1 \
	AWS_ACCESS_KEY_ID=$(KIND_S3_USER) AWS_SECRET_ACCESS_KEY=$(KIND_S3_PASSWORD)
KIND_SELECTOR = app.kubernetes.io/instance=$(RELEASE)
# Forward the in-chart MinIO to 127.0.0.1:$(KIND_S3_PORT) for this recipe's shell; wait for it.
define kind_minio_forward
svc=$$($(KIND_KUBECTL) get svc -l $(KIND_SELECTOR),app.kubernetes.io/component=minio -o name); \
$(KIND_KUBECTL) port-forward $$svc $(KIND_S3_PORT):9000 >/dev/null & pf=$$!; \
trap "kill $$pf" EXIT; \
for i in $$(seq 60); do \
  $(KIND_S3_ENV) $(PY) -c "import boto3; boto3.client('s3').list_buckets()" 2>/dev/null && break; \
  sleep 1; \
done;
endef

# --- image: built with no registry but the package indexes -----------------------------------
# The base is Debian bookworm's python3.11 from Debian packages (debootstrap, docker import),
# built once and kept: `make base-image` (about a minute; the tag names the recipe: change it
# with the recipe). Like Debian's slim images it drops documentation, manual pages and message
# translations (keeping the copyright files) and tells dpkg to leave them out of later installs.
# PYTHON_IMAGE=python:3.11-slim-bookworm builds on the registry's Python image instead.
# PIP_CERT=path: a CA bundle for pip inside the build (a TLS-intercepting proxy), passed as a
# BuildKit secret, never stored in a layer (tests/test_image.py checks the layers and history).
# A Docker engine that is not running is started here when we are root (dockerd, host
# networking only: containers run with --network host).
# /usr/bin/docker first: a distribution's client with BuildKit built in (a bare client
# elsewhere on PATH may lack the buildx plugin that BuildKit builds need).
DOCKER ?= $(firstword $(wildcard /usr/bin/docker) docker)
BASE_IMAGE ?= skinlesion-base:bookworm-slim
PYTHON_IMAGE ?= $(BASE_IMAGE)
PIP_CERT ?=
DOCKERD_LOG ?= /tmp/skinlesion-dockerd.log
PIP_SECRET = --secret id=pipcert$(comma)src=$(PIP_CERT)
comma := ,
DOCKER_BUILD = DOCKER_BUILDKIT=1 $(DOCKER) build --network host --build-arg PYTHON_IMAGE=$(PYTHON_IMAGE) \
	$(if $(PIP_CERT),$(PIP_SECRET))
define SLIM_DPKG
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
endef
export SLIM_DPKG

docker-engine:
	@$(DOCKER) info >/dev/null 2>&1 && exit 0; \
	command -v dockerd >/dev/null || { echo "docker-engine: no Docker engine; install docker.io (apt-get install docker.io debootstrap)" >&2; exit 1; }; \
	[ "$$(id -u)" = 0 ] || { echo "docker-engine: the Docker engine is not running and only root can start it (sudo dockerd)" >&2; exit 1; }; \
	echo "docker-engine: starting dockerd (log: $(DOCKERD_LOG))"; \
	nohup dockerd --bridge=none --iptables=false --ip6tables=false >$(DOCKERD_LOG) 2>&1 </dev/null & \
	for i in $$(seq 60); do $(DOCKER) info >/dev/null 2>&1 && exit 0; sleep 1; done; \
	echo "docker-engine: dockerd did not start, see $(DOCKERD_LOG)" >&2; exit 1

base-image: docker-engine
	@$(DOCKER) image inspect $(BASE_IMAGE) >/dev/null 2>&1 && exit 0; \
	command -v debootstrap >/dev/null || { echo "base-image: install debootstrap (apt-get install debootstrap)" >&2; exit 1; }; \
	[ "$$(id -u)" = 0 ] || { echo "base-image: debootstrap needs root" >&2; exit 1; }; \
	set -euo pipefail; root=$$(mktemp -d); trap 'rm -rf "$$root"' EXIT; \
	debootstrap --variant=minbase --include=python3.11,python3-venv bookworm "$$root" $(DEBIAN_MIRROR); \
	printf '%s\n' "$$SLIM_DPKG" > "$$root"/etc/dpkg/dpkg.cfg.d/skinlesion-slim; \
	find "$$root"/usr/share/doc -mindepth 1 -not -name copyright -not -type d -delete; \
	find "$$root"/usr/share/doc -mindepth 1 -type d -empty -delete; \
	rm -rf "$$root"/usr/share/man/* "$$root"/usr/share/info/* "$$root"/usr/share/locale/*; \
	rm -rf "$$root"/var/cache/apt/archives/*.deb "$$root"/var/cache/apt/*.bin \
	  "$$root"/var/lib/apt/lists/* "$$root"/var/log/*; \
	tar -C "$$root" -c . | $(DOCKER) import -c 'ENV LANG=C.UTF-8' - $(BASE_IMAGE) >/dev/null; \
	echo "base-image: $(BASE_IMAGE) built"

$(if $(filter $(BASE_IMAGE),$(PYTHON_IMAGE)),image image-gpu: base-image)

image: docker-engine
	$(DOCKER_BUILD) -t $(IMAGE):$(TAG) .

image-gpu: docker-engine
	$(DOCKER_BUILD) --build-arg TF_VARIANT=gpu -t $(IMAGE):$(TAG)-gpu .

# kind cluster + image + chart with MinIO (values-kind.yaml) + bucket + synthetic sample data.
kind-up: image setup
	kind get clusters | grep -qx '$(KIND_CLUSTER)' || kind create cluster --name $(KIND_CLUSTER) --wait 120s
	kind load docker-image $(IMAGE):$(TAG) --name $(KIND_CLUSTER)
	kubectl create namespace $(NAMESPACE) --dry-run=client -o yaml | kubectl --context kind-$(KIND_CLUSTER) apply -f -
	$(KIND_KUBECTL) create secret generic $(KIND_S3_SECRET) \
	  --from-literal=AWS_ACCESS_KEY_ID=$(KIND_S3_USER) \
	  --from-literal=AWS_SECRET_ACCESS_KEY=$(KIND_S3_PASSWORD) \
	  --dry-run=client -o yaml | $(KIND_KUBECTL) apply -f -
	$(KIND_HELM) upgrade --install $(RELEASE) charts/skinlesion -n $(NAMESPACE) \
	  -f $(VALUES) $(HELM_SET_IMAGE) --wait --timeout 10m
	$(KIND_KUBECTL) wait --for=condition=Available deployment \
	  -l $(KIND_SELECTOR),app.kubernetes.io/component=minio --timeout=300s
	@set -euo pipefail; $(kind_minio_forward) \
	$(KIND_S3_ENV) $(PY) -c "import boto3; c = boto3.client('s3'); \
	  b = '$(KIND_BUCKET)'; b in [x['Name'] for x in c.list_buckets()['Buckets']] or c.create_bucket(Bucket=b)"; \
	$(KIND_S3_ENV) $(BIN)/skinlesion sample-data --images $(KIND_IMAGES) \
	  --out s3://$(KIND_BUCKET)/$(KIND_PREFIX)/raw/HAM10000 >/dev/null; \
	echo "kind-up: synthetic data in s3://$(KIND_BUCKET)/$(KIND_PREFIX)/raw/HAM10000; next: make kind-test"

# Install or upgrade the release on the current kube context with $(VALUES).
deploy:
	helm upgrade --install $(RELEASE) charts/skinlesion -n $(NAMESPACE) --create-namespace \
	  -f $(VALUES) $(HELM_SET_IMAGE)

# One small pipeline run on kind: the controller Job with a fresh run id, its log, its metrics.
kind-test: setup
	@set -euo pipefail; \
	run=kt-$$(date +%Y%m%d%H%M%S); \
	$(KIND_HELM) upgrade --install $(RELEASE) charts/skinlesion -n $(NAMESPACE) \
	  -f $(VALUES) $(HELM_SET_IMAGE) --set run.enabled=true --set run.id=$$run >/dev/null; \
	job=$$($(KIND_KUBECTL) get jobs -o name \
	  -l $(KIND_SELECTOR),app.kubernetes.io/component=controller,skinlesion.io/run-id=$$run); \
	echo "kind-test: run $$run, controller $$job"; \
	$(KIND_KUBECTL) logs -f --pod-running-timeout=10m $$job || true; \
	deadline=$$(( $$(date +%s) + $(KIND_TIMEOUT_S) )); \
	until state=$$($(KIND_KUBECTL) get $$job \
	    -o jsonpath='{.status.conditions[?(@.status=="True")].type}') \
	    && [[ " $$state " == *" Complete "* || " $$state " == *" Failed "* ]]; do \
	  (( $$(date +%s) < deadline )) || { echo "kind-test: timed out"; exit 1; }; sleep 5; \
	done; \
	$(KIND_KUBECTL) get jobs -l $(KIND_SELECTOR) -L app.kubernetes.io/component; \
	[[ " $$state " == *" Complete "* ]] || { echo "kind-test: run $$run failed ($$state)"; exit 1; }; \
	$(kind_minio_forward) \
	$(KIND_S3_ENV) $(PY) -c "import sys; from skinlesion.local_run import format_metrics; \
	  from skinlesion.storage import get_json, open_store; \
	  print(format_metrics(get_json(open_store(sys.argv[1]), 'metrics.json')))" \
	  s3://$(KIND_BUCKET)/$(KIND_PREFIX)/runs/$$run/evaluate
