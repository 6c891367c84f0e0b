# Two commands a newcomer needs: `make train` and `make test`. Both set up .venv first (idempotent).
SHARED_DATA := ../shared/data/cifar10-train-jpg.tar.gz
VENV   ?= .venv
PYTHON ?= python3
DATA   ?= $(if $(wildcard $(SHARED_DATA)),$(SHARED_DATA),cifar10)
# no GPU: fast-cpu, the best model this machine trains in 15 minutes; CUDA: the lesson's CNN
RECIPE ?= $(shell $(BIN)/python -c "import torch; print('seed-cnn' if torch.cuda.is_available() else 'fast-cpu')" 2>/dev/null || echo fast-cpu)
OUT    ?= runs/$(RECIPE)
ARGS   ?=
TEST_DATA ?= $(wildcard $(SHARED_DATA))
BIN := $(VENV)/bin

.PHONY: setup train test test-all lint format bench

setup: $(BIN)/cifarlab

# Reinstalls only when the project's requirements change; a second `make setup` takes seconds.
$(BIN)/cifarlab: pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	@touch $@

train: setup
	$(BIN)/cifarlab train --recipe $(RECIPE) --data $(DATA) --out $(OUT) $(ARGS)
	$(BIN)/cifarlab evaluate $(OUT) --tta flip-translate

lint: setup
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/ruff format --check src tests benchmarks examples

format: setup
	$(BIN)/ruff format src tests benchmarks examples
	$(BIN)/ruff check --fix src tests benchmarks examples

# fast tier (unit tests, tiny models; <= 4 min on 2 cores); test-all: everything, what CI runs.
# One pytest worker (pytest-xdist) per CPU this process may use, at most 8: each imports torch
# and trains the shared fixtures again. WORKERS=0 runs the tests in this process.
WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); echo $$(( n < 8 ? n : 8 )))
PYTEST := CIFARLAB_TEST_DATA=$(TEST_DATA) $(BIN)/pytest -n $(WORKERS)
test: lint
	$(PYTEST) -m "not slow" $(PYTEST_ARGS)

test-all: lint
	$(PYTEST) $(PYTEST_ARGS)

bench: setup
	$(BIN)/python benchmarks/speed.py --data $(DATA)
