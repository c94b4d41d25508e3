# Two entry points for a fresh clone: `make repro` and `make test`. Both create .venv with the
# pinned versions in constraints.txt first (again only when pyproject.toml or constraints change).
PYTHON ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
STAMP := $(VENV)/.installed
# The loader benchmark's own environment: torchvision and LitData, never in the test venv.
BENCH_VENV := .venv-bench
BENCH_BIN := $(CURDIR)/$(BENCH_VENV)/bin
BENCH_STAMP := $(BENCH_VENV)/.installed

.PHONY: setup repro test test-fast test-slow lint bench bench-loader-env bench-loader

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check 'pip==26.3'
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test]'
	@# The PyTorch DataLoader test needs the CPU build of torch. Install it only where that exact
	@# build can be had without a multi-GB CUDA download; elsewhere that one test is skipped.
	-$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt \
	    'torch==2.13.0+cpu' 2>/dev/null || echo "torch CPU build not available: DataLoader test will be skipped"
	touch $(STAMP)

setup: $(STAMP)

repro: setup
	PATH="$(BIN):$$PATH" DVC_NO_ANALYTICS=1 dvc repro

test: test-fast test-slow

test-fast: setup
	PATH="$(BIN):$$PATH" $(BIN)/python -m pytest -m "not slow"

test-slow: setup
	PATH="$(BIN):$$PATH" $(BIN)/python -m pytest -m slow || [ $$? -eq 5 ]

lint: setup
	$(BIN)/ruff check pipeline tests bench
	$(BIN)/mypy

bench: setup
	$(BIN)/python bench/bench_ingest.py
	$(BIN)/python bench/bench_stats.py
	$(BIN)/python bench/bench_normalize.py
	$(BIN)/python bench/bench_incremental.py
	$(BIN)/python bench/bench_cluster.py

# PyPI's torchvision does not import beside the CPU torch of the test venv, so this venv gets the
# default torch build (a CUDA build, about 5.5 GB, that runs on the CPU) and the project with
# every other pin. LitData, not MosaicML Streaming: streaming 0.13 requires numpy < 2.2.
$(BENCH_STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_BIN)/python -m pip install --quiet --disable-pip-version-check 'pip==26.3'
	$(BENCH_BIN)/python -m pip install --quiet --disable-pip-version-check \
	    'torch==2.14.1' 'torchvision==0.29.1'
	grep -v '^torch==' constraints.txt > $(BENCH_VENV)/constraints.txt
	$(BENCH_BIN)/python -m pip install --quiet --disable-pip-version-check \
	    -c $(BENCH_VENV)/constraints.txt -e . 'litdata==0.2.76'
	touch $(BENCH_STAMP)

bench-loader-env: $(BENCH_STAMP)

bench-loader: bench-loader-env
	PATH="$(BENCH_BIN):$$PATH" $(BENCH_BIN)/python bench/bench_loader.py
