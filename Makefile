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

# The suite in six pytest processes, two at a time on the two cores, the longest groups first (one process for
# all of it crashed in XLA's CPU compiler late in the run, see tests/conftest.py). Each group's output is
# printed whole when it ends (logs in .pytest-groups/); every group runs, and any failure fails the target.
TEST_GROUPS = "tests/test_[m-z]*.py" "tests/test_[a-l]*.py" tests/training "tests/inference/test_[a-l]*.py" \
	"tests/inference/test_[m-z]*.py" tests/jaxmodel
TEST_JOBS ?= 2
test: $(STAMP)
	@rm -rf .pytest-groups && mkdir .pytest-groups
	@printf '%s\n' $(TEST_GROUPS) | xargs -P $(TEST_JOBS) -I GROUP sh -c 'log=".pytest-groups/$$(echo "GROUP" \
	| tr -c "a-zA-Z0-9\n" _).log"; $(BIN)/python -m pytest -q -p no:cacheprovider --durations=5 GROUP >"$$log" 2>&1; \
	status=$$?; echo "=== pytest GROUP: exit $$status"; cat "$$log"; exit $$status'

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
