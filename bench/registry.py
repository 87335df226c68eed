"""The benchmark families, in the order the main job runs and prints them, and the lookups over them.

To add a family: a module with a bench.family.Family subclass (its cases, providers and check), listed in
FAMILIES; `python -m bench --ops <its ops>` runs it, and `pytest bench/` times it under pytest-benchmark.
"""
from . import cpu_path, entropy_change, lm_head, logprobs, policy_loss, report

FAMILIES = (logprobs.FAMILY, lm_head.FAMILY, policy_loss.FAMILY, entropy_change.FAMILY, cpu_path.FAMILY)
OPS = tuple(op for family in FAMILIES for op in family.ops)
CONVENTIONS = {**report.CONVENTIONS, **{k: v for family in FAMILIES for k, v in family.conventions.items()}}
NOT_COMPILED = "torch.compile not run on the CPU (slow to compile; --compile to include)"


def runs_unasked(family, on_gpu, main_job=True):
    """Whether the family runs when no op is named: the CPU figures only without a GPU, and in the main job
    only the families it measures by default (the pytest-benchmark suite has them all)."""
    return (family.in_main_job or not main_job) and not (on_gpu and family.cpu_figures)


def skips(family, on_gpu, compile_on_cpu=False):
    """{provider name: why it does not run}: torch.compile is left out on a CPU (minutes of compiling
    next to interpreted kernels) except where the CPU figures are set against it."""
    if on_gpu or compile_on_cpu or family.cpu_figures:
        return {}
    return {"compiled_ref": NOT_COMPILED}


def select(names):
    """{family: its providers named in `names`} (all when names is None); a name no family knows is an
    error, not a silent no-op ("python_ref" names a provider of each family)."""
    if names is None:
        return {family: list(family.providers) for family in FAMILIES}
    unknown = [n for n in names if all(n not in family.by_name for family in FAMILIES)]
    if unknown:
        known = ", ".join(f"{list(family.by_name)} ({family.title})" for family in FAMILIES)
        raise ValueError(f"unknown providers {unknown}; known: {known}")
    return {family: [p for p in family.providers if p.name in names] for family in FAMILIES}
