# The two commands a newcomer needs:  `make run`  (set up + serve)  and  `make test`.
# Both work on a fresh machine with only python3 and make, and are idempotent.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
SPARTAN := $(VENV)/bin/spartan
# Re-install only when pyproject.toml changes.
STAMP := $(VENV)/.installed-$(shell sha256sum pyproject.toml | cut -c1-16)
# The peer-comparison environment (transformers 4.57.6 + adapters + PEFT): benchmarks/requirements-peers.txt
PEERS ?= .venv-peers
PEERS_STAMP := $(PEERS)/.installed-$(shell cat pyproject.toml benchmarks/requirements-peers.txt | sha256sum | cut -c1-16)
# The other CPU runtimes for the engine benchmark (ONNX Runtime, OpenVINO): benchmarks/requirements-runtimes.txt
RUNTIMES ?= .venv-runtimes
RUNTIMES_STAMP := $(RUNTIMES)/.installed-$(shell cat pyproject.toml benchmarks/requirements-runtimes.txt | sha256sum | cut -c1-16)
# infinity-emb (torch and ONNX engines) for the service comparison: benchmarks/requirements-infinity.txt.
# Benchmark-only and not needed by `make test`; spartan-serve is not installed in it.
INFINITY ?= .venv-infinity
INFINITY_STAMP := $(INFINITY)/.installed-$(shell sha256sum benchmarks/requirements-infinity.txt | cut -c1-16)
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: setup assets run test lint unit bench peers-env runtimes-env infinity-env system-deps help

help:
	@echo "make run    set up .venv, fetch the offline assets, serve memories/ on http://$(HOST):$(PORT)"
	@echo "make test   set up, fetch, lint (ruff, mypy) and run the whole test suite"
	@echo "make bench  run the benchmarks (results go to docs/)"
	@echo "make peers-env  the peer-comparison environment ($(PEERS): transformers 4.57.6, adapters, PEFT)"
	@echo "make runtimes-env  ONNX Runtime and OpenVINO for the engine benchmark ($(RUNTIMES))"
	@echo "make infinity-env  infinity-emb for the service comparison ($(INFINITY); not needed by make test)"

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $@

$(PEERS_STAMP): pyproject.toml benchmarks/requirements-peers.txt
	python3 -m venv $(PEERS)
	$(PEERS)/bin/python -m pip install --quiet --disable-pip-version-check -r benchmarks/requirements-peers.txt -e .
	rm -f $(PEERS)/.installed-*
	touch $@

peers-env: $(PEERS_STAMP)

$(RUNTIMES_STAMP): pyproject.toml benchmarks/requirements-runtimes.txt
	python3 -m venv $(RUNTIMES)
	$(RUNTIMES)/bin/python -m pip install --quiet --disable-pip-version-check -r benchmarks/requirements-runtimes.txt -e .
	rm -f $(RUNTIMES)/.installed-*
	touch $@

runtimes-env: $(RUNTIMES_STAMP)

$(INFINITY_STAMP): benchmarks/requirements-infinity.txt
	python3 -m venv $(INFINITY)
	$(INFINITY)/bin/python -m pip install --quiet --disable-pip-version-check -r benchmarks/requirements-infinity.txt
	rm -f $(INFINITY)/.installed-*
	touch $@

infinity-env: $(INFINITY_STAMP)

setup: $(STAMP) assets

# Verified by sha256; a no-op (a few seconds of hashing) when everything is already there.
assets: $(STAMP)
	$(SPARTAN) fetch

run: setup
	$(SPARTAN) serve --host $(HOST) --port $(PORT)

lint: $(STAMP)
	$(VENV)/bin/ruff check app tests benchmarks
	$(VENV)/bin/ruff format --check app tests benchmarks
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

# Real Prometheus (promtool) and nginx for the scale-out tests, and Chromium for the page's test, from
# Debian's packages; a no-op when all are there. Needs root or sudo on a machine without them.
system-deps:
	@command -v prometheus >/dev/null && command -v promtool >/dev/null && command -v nginx >/dev/null \
	  && command -v chromium >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q --no-install-recommends prometheus nginx-light chromium; }

# The suite also runs the peer benchmarks' smoke modes, which need the peers' environment.
test: setup peers-env runtimes-env system-deps lint
	$(PY) -m pytest

bench: setup
	$(PY) benchmarks/bench_memory_scaling.py --children 3 --cells 48 4096 --shapes batch \
	  --paths expanded dense sparse auto --name bench_memory_layer
	$(PY) benchmarks/bench_engine.py speed --runtimes torch:fp32 --threads 2 --cells 1x128 32x128 --rounds 9 \
	  --out docs --name bench_encoder_overhead
	$(PY) benchmarks/bench_routing.py
