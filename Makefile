# Two commands on a fresh machine (each builds .venv first if needed):
#   make smoke   run the main job: the offline smoke recipe, through the launcher, on the CPU
#   make test    run the whole test suite (what .ci/run runs)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: smoke test lint clean

$(STAMP): requirements/cpu-dev.txt requirements/unsloth.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -r requirements/cpu-dev.txt
	$(PY) -m pip install --quiet --no-deps -r requirements/unsloth.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

smoke: $(STAMP)
	$(PY) -m entrypoint run smoke

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

clean:
	rm -rf $(VENV) outputs
