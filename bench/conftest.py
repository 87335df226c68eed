"""pytest-benchmark suite set-up: `pytest bench/ [--bench-mode quick] --benchmark-...`.

Without a GPU the Triton kernels run under the interpreter (set here before anything imports covkernels)
on tiny shapes only, and the report header says that those times are not speed figures.
"""
from bench.env import use_interpreter_without_gpu

INTERPRETED = use_interpreter_without_gpu()

import pytest
import torch

from bench import cases as C
from bench import providers as P
from bench.suite import bench_mode


def pytest_addoption(parser):
    parser.addoption("--bench-mode", default=None, choices=("tiny", "quick", "default", "full"),
                     help="shapes of the bench suite ('default' on a GPU unless given; 'tiny' on a CPU)")


def pytest_report_header(config):
    if torch.cuda.is_available():
        return (f"covkernels bench: {torch.cuda.get_device_name()}, shapes '{bench_mode(config)}', "
                "CUDA-synchronised timings")
    return ("covkernels bench: NO GPU -- tiny shapes with the Triton kernels under the INTERPRETER; "
            "the times are interpreter times, NOT speed figures")


def pytest_terminal_summary(terminalreporter, config):
    if not torch.cuda.is_available():
        terminalreporter.write_line("covkernels bench: times above are Triton-interpreter times on a CPU, "
                                    "NOT speed figures; run on a GPU for numbers.", yellow=True)


def pytest_generate_tests(metafunc):
    """case x provider for the module's OP ("fwd", "fwd_bwd") with readable ids."""
    op = getattr(metafunc.module, "OP", None)
    if op is None:
        return
    if "case" in metafunc.fixturenames:
        todo = C.cases(bench_mode(metafunc.config), ops=(op,))
        metafunc.parametrize("case", todo, ids=[c.name.split(" ", 1)[1].replace(" ", "-") for c in todo])
    if "provider" in metafunc.fixturenames:
        chosen = [p for p in P.PROVIDERS if op in p.ops]
        metafunc.parametrize("provider", chosen, ids=[p.name for p in chosen])


@pytest.fixture(scope="session")
def copy_gbps():
    from bench import timing

    return timing.copy_bandwidth_gbps()
