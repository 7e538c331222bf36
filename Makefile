# `make demo` and `make test` set up everything they need on a fresh machine:
# a virtual environment in .venv with the package and its test tools, and the
# Fashion-MNIST files (Debian's dataset-fashion-mnist) when running as root.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
FASHION_DIR := /usr/share/datasets/fashion-mnist
DEMO_ARGS ?=

.PHONY: all demo test lint format setup data bench compat clean

all: test

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

data:
	@if [ -f $(FASHION_DIR)/train-images-idx3-ubyte.gz ] || [ -f $(FASHION_DIR)/train-images-idx3-ubyte ]; then \
		echo "Fashion-MNIST found in $(FASHION_DIR)"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		apt-get install -y -q dataset-fashion-mnist || \
		(apt-get update -q && apt-get install -y -q dataset-fashion-mnist); \
	else \
		echo "Fashion-MNIST is missing from $(FASHION_DIR)."; \
		echo "Install it with: sudo apt-get install dataset-fashion-mnist (Debian/Ubuntu),"; \
		echo "or put the four IDX files in a folder and run wcl with --set data.root=FOLDER,"; \
		echo "or let torchvision download them: --set data.download=true data.root=data/fashion-mnist"; \
		exit 1; \
	fi

demo: setup data
	$(BIN)/wcl demo --out runs/demo $(DEMO_ARGS)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: setup data lint
	$(BIN)/python -m pytest

# CPU benchmarks (BENCHMARKS.md); eval_cost needs the demo's checkpoint (make demo first).
bench: setup data
	mkdir -p runs/bench
	$(BIN)/python bench/weak_labels.py
	$(BIN)/python bench/graph_loss.py
	$(BIN)/python bench/blur.py
	$(BIN)/python bench/batch_params.py
	$(BIN)/python bench/augment_pipeline.py
	$(BIN)/python bench/train_step.py
	$(BIN)/python bench/multicrop.py
	$(BIN)/python bench/layout.py
	$(BIN)/python bench/view_passes.py
	$(BIN)/python bench/worker_startup.py
	@if [ -f runs/demo/wcl/last.pt ]; then $(BIN)/python bench/eval_cost.py runs/demo/wcl/last.pt; \
	else echo "bench/eval_cost.py skipped: run make demo first (it needs runs/demo/wcl/last.pt)"; fi

# The test suite on other releases than .venv's, in a venv of its own (not part of `make
# test`; downloads from PyPI). Default: the lowest releases pyproject.toml admits, on the
# lowest Python it admits. Another set: make compat COMPAT_RESOLUTION=highest
# COMPAT_PYTHON=3.11 COMPAT_PINS="torch==2.11.0 torchvision==0.26.0"
COMPAT_VENV := .venv-compat
COMPAT_PYTHON ?= 3.10
COMPAT_RESOLUTION ?= lowest-direct
COMPAT_PINS ?=

compat: setup data
	$(BIN)/python -m pip install -q uv
	rm -rf $(COMPAT_VENV)
	$(BIN)/uv venv -q -p $(COMPAT_PYTHON) $(COMPAT_VENV)
	VIRTUAL_ENV=$(COMPAT_VENV) $(BIN)/uv pip install -q --resolution $(COMPAT_RESOLUTION) \
		-e '.[dev]' $(COMPAT_PINS)
	VIRTUAL_ENV=$(COMPAT_VENV) $(BIN)/uv pip list
	$(COMPAT_VENV)/bin/python -m pytest -p no:cacheprovider

clean:
	rm -rf runs .pytest_cache .ruff_cache $(COMPAT_VENV)
