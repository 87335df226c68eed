"""Microbenchmarks of covkernels against python_ref and the peers (TRL, verl, Liger-Kernel, Cut
Cross-Entropy).

`python -m bench` is the main job (a table, and a results JSON on a GPU): the logits path (cases.py,
providers.py, runner.py, check.py) and the fused LM head (cases_linear.py, providers_linear.py,
runner_linear.py, check_linear.py); `python -m bench.compare` turns results files from several GPUs into
one Markdown table and one chart; `pytest bench/ --benchmark-...` runs the logits providers under
pytest-benchmark. Without a GPU everything runs on tiny shapes under the Triton interpreter, and the
times are then interpreter times, not speed figures.

Importing this package imports neither torch nor covkernels: `bench.env` must run first to decide whether
Triton's interpreter is needed, because TRITON_INTERPRET is read when the kernels are defined.
"""
