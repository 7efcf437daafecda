# Two entry points for a fresh machine with Python >= 3.10 (3.11 recommended):
#   make run    set up .venv and run the main job (a default `sgn-lab measure`, then its plots)
#   make test   set up .venv and run the fast test suite
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
# The constraints file pins torch to the CPU build (and everything else), so a fresh machine
# never pulls several GB of CUDA wheels. GPU users: see docs/index.md, "Using a GPU".
CONSTRAINTS ?= constraints.txt

.PHONY: setup run test test-all lint docs clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c $(CONSTRAINTS) -e '.[dev]'
	touch $@

# The main job: a default measurement run (MLP on MNIST-1D with PNM), then its figures.
# A second `make run` continues an interrupted run (--resume), or leaves a complete one as it is.
RUN_DIR ?= runs/quickstart
run: setup
	if [ -f $(RUN_DIR)/config.json ]; then $(BIN)/sgn-lab measure --out $(RUN_DIR) --resume; \
	else $(BIN)/sgn-lab measure --out $(RUN_DIR); fi
	$(BIN)/sgn-lab plot $(RUN_DIR)

test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

test-all: setup
	$(BIN)/python -m pytest -q -m "slow or not slow"

lint: setup
	$(BIN)/ruff check .

# The documentation: every code block of the README and the site run as written (about five
# minutes on 2 cores), then the site in site/, warnings as errors (reference pages generated).
docs: setup
	$(BIN)/python -m pytest -q -m docs
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

clean:
	rm -rf $(VENV) build site *.egg-info
