# Two commands on a fresh machine (each builds .venv first if needed):
#   make smoke   run the main job: the offline smoke recipe, through the launcher, on the CPU
#   make test    run the whole test suite (what .ci/run runs; it builds the image too)
# and, for the image:
#   make image   docker build -t unsloth-recipes . (starts the engine and builds a stand-in base where needed)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
IMAGE  ?= unsloth-recipes

.PHONY: smoke test image lint lock llama-cpp clean

# Every package is pinned in a lock and installed with --no-deps: nothing is resolved here, so
# what the package index publishes later cannot change this environment (requirements/lock.py).
# --require-hashes: pip refuses any file whose sha256 the lock does not hold. The project itself
# is a pip call of its own: an editable install has no hash.
$(STAMP): requirements/cpu-dev.lock requirements/unsloth.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --no-deps --require-hashes -r requirements/cpu-dev.lock
	$(PY) -m pip install --quiet --no-deps --require-hashes -r requirements/unsloth.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

smoke: $(STAMP)
	$(PY) -m entrypoint run smoke

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest

# .ci/image.sh says how: the engine, the base (nvidia/cuda, or the stand-in where Docker Hub is out
# of reach) and the builder.
image:
	IMAGE=$(IMAGE) .ci/image.sh

# Re-resolve requirements/*.in into their locks, with every file's sha256, as of now (after
# editing an .in file, or to take newer releases on purpose); commit the .in and .lock files together.
lock: $(STAMP)
	$(PY) requirements/lock.py write

# The pinned llama.cpp that GGUF exports use (requirements/llama_cpp.py): compiled into
# .venv/llama.cpp, where `export --to gguf:...` finds it with UNSLOTH_LLAMA_CPP_PATH set there
# (llama-quantize, and llama-perplexity and llama-completion, which check each GGUF file).
llama-cpp: $(STAMP)
	$(PY) requirements/llama_cpp.py $(VENV)/llama.cpp

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

clean:
	rm -rf $(VENV) outputs
