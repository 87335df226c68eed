"""Microbenchmarks of covkernels against python_ref and the peers (TRL, verl, Liger-Kernel, Cut
Cross-Entropy).

One registry of families (registry.py), each one op's cases, providers and check in its own module
(logprobs.py: the fused log-prob/entropy pass and AEnt; lm_head.py with lm_head_providers.py: the fused
LM head; policy_loss.py; entropy_change.py; cpu_path.py: the CPU path as CPU figures), on the layout of
cases.py and the base class of family.py. One runner (runner.py) checks every provider against python_ref
in float64 by the rule the tests use too (tolerances.py), times it (timing.py) and writes one row schema.
`python -m bench` is the main job (a table per family, and a results JSON on a GPU); `pytest bench/
--benchmark-...` is the same registry under pytest-benchmark (test_bench_families.py); `python -m
bench.compare` turns results files from several GPUs into one Markdown table and one chart. Without a GPU
everything runs on tiny shapes under the Triton interpreter, and the times are then interpreter times,
not speed figures.

Importing this package imports neither torch nor covkernels: `bench.env` must run first to decide whether
Triton's interpreter is needed, because TRITON_INTERPRET is read when the kernels are defined.
"""
