# The two Quickstart commands: `make bench` (the main job) and `make test` (the suite CI runs);
# `make fuzz` runs only the property tests (hypothesis), 600 generated cases each instead of CI's 15.
PYTHON ?= python3
# The Triton of the H200 machine the kernels are measured on: `make test` runs the kernel tests under it too,
# installed beside the suite's own Triton (a folder on PYTHONPATH, not the environment).
GPU_TRITON ?= 3.6.0
GPU_TRITON_DIR := .triton-$(GPU_TRITON)

.PHONY: setup bench test test-gpu-triton fuzz

# torch 2.13.0 is asked for by version only when no torch is installed: it resolves to the CPU build on
# machines without CUDA, and an existing (GPU) torch is never replaced.
setup:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q torch==2.13.0
	$(PYTHON) -m pip install -q -e ".[test,bench,peers]"

bench: setup
	$(PYTHON) -m bench

test: setup
	$(PYTHON) -m pytest -q
	$(MAKE) --no-print-directory test-gpu-triton

# The tests that run Triton kernels (interpreter on a CPU), under the GPU machine's Triton.
test-gpu-triton:
	test -d $(GPU_TRITON_DIR) || $(PYTHON) -m pip install -q --no-deps --target $(GPU_TRITON_DIR) triton==$(GPU_TRITON)
	PYTHONPATH=$(GPU_TRITON_DIR) $(PYTHON) -m pytest -q -m "not peers" -p no:cacheprovider

fuzz: setup
	HYPOTHESIS_PROFILE=fuzz $(PYTHON) -m pytest -q -m hypothesis --hypothesis-show-statistics
