# The README's Quickstart: `make demo` runs the main job end to end, `make test` runs the test suite.
# Each target creates the virtual environment it needs (.venv) from the project's own files.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-test

.PHONY: demo test bench lint clean

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test,tpu,demo,eval]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/normistral demo --workdir demo-run

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

# The CPU benchmarks of BENCHMARKS.md (about 20 minutes on 2 cores; long_context alone ~10).
bench: $(STAMP)
	$(BIN)/python bench/prefill.py
	$(BIN)/python bench/train.py
	$(BIN)/python bench/decode.py
	$(BIN)/python bench/convert_memory.py
	$(BIN)/python bench/long_context.py
	$(BIN)/python bench/eval.py

clean:
	rm -rf $(VENV) demo-run .pytest_cache
