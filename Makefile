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

# The suite in four processes (each compiles fewer XLA programs: one process for all of it crashed in XLA's
# CPU compiler late in the run, see tests/conftest.py); every group runs, and any failure fails the target.
TEST_GROUPS = "tests/inference/test_[a-l]*.py" "tests/inference/test_[m-z]*.py" tests/jaxmodel \
	"tests --ignore=tests/inference --ignore=tests/jaxmodel"
test: $(STAMP)
	@status=0; for group in $(TEST_GROUPS); do $(BIN)/python -m pytest -q $$group || status=1; done; exit $$status

# The CPU benchmarks of BENCHMARKS.md (about 20 minutes on 2 cores; long_context alone ~10).
bench: $(STAMP)
	$(BIN)/python bench/prefill.py
	$(BIN)/python bench/train.py
	$(BIN)/python bench/decode.py
	$(BIN)/python bench/convert_memory.py
	$(BIN)/python bench/long_context.py
	$(BIN)/python bench/eval.py

# One benchmark on whatever accelerator JAX finds (bench/accelerator.py, ~8 minutes on one H100; add
# ACCEL_ARGS="--quick" or "--json FILE"). Uses .venv when there is one, else $(PYTHON) as it is: a lent GPU
# image brings its own JAX and cannot install anything.
.PHONY: bench-accelerator
ACCEL_ARGS ?=
bench-accelerator:
	$(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON)) bench/accelerator.py $(ACCEL_ARGS)

clean:
	rm -rf $(VENV) demo-run .pytest_cache
