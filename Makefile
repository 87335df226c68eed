# The two Quickstart commands: `make bench` (the main job) and `make test` (the suite CI runs);
# `make fuzz` runs only the property tests (hypothesis), 600 generated cases each instead of CI's 15.
PYTHON ?= python3

.PHONY: setup bench test fuzz

# torch 2.13.0 is asked for by version only when no torch is installed: it resolves to the CPU build on
# machines without CUDA, and an existing (GPU) torch is never replaced.
setup:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q torch==2.13.0
	$(PYTHON) -m pip install -q -e ".[test,bench,peers]"

bench: setup
	$(PYTHON) -m bench

test: setup
	$(PYTHON) -m pytest -q

fuzz: setup
	HYPOTHESIS_PROFILE=fuzz $(PYTHON) -m pytest -q -m hypothesis --hypothesis-show-statistics
