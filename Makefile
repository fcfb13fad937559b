# Two commands work on a fresh machine: `make demo` and `make test`.
# torch is pinned in the same pip command as the rest: a looser spec pulls the CUDA build.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench bench-offload lint install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check torch==2.13.0 -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m shunter.demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not bench" tests

bench: $(STAMP)
	$(BIN)/python bench/inmemory.py --reps 7

# needs root: memory cgroups and dropping the page cache
bench-offload: $(STAMP)
	$(BIN)/python bench/offload.py --reps 5 --new-tokens 8

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
