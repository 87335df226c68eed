"""pytest-benchmark suite set-up: `pytest bench/ [--bench-mode quick] [-k lm_head] --benchmark-...`.

The suite is generated from the registry: one test per (case, provider) of every family that runs here
(the CPU family only without a GPU), with ids "<case name>-<provider>". Without a GPU the Triton kernels
run under the interpreter (set here before anything imports covkernels) on tiny shapes only, and the report
header says that those times are not speed figures.
"""
from bench.env import use_interpreter_without_gpu

INTERPRETED = use_interpreter_without_gpu()

import pytest
import torch

from bench import registry


def pytest_addoption(parser):
    parser.addoption("--bench-mode", default=None, choices=("tiny", "quick", "default", "full"),
                     help="shapes of the bench suite ('default' on a GPU unless given; 'tiny' on a CPU)")
    parser.addoption("--compile", action="store_true", help="run torch.compile(python_ref) on a CPU too")


def bench_mode(config):
    """The suite's shapes: --bench-mode on a GPU ("default" if not given); always "tiny" on a CPU."""
    if not torch.cuda.is_available():
        return "tiny"
    return config.getoption("--bench-mode") or "default"


def generated(mode, on_gpu):
    """[(family, case, provider)] of the suite: every provider of every case of the families that run here."""
    return [(family, case, provider) for family in registry.FAMILIES
            if registry.runs_unasked(family, on_gpu, main_job=False)
            for case in family.cases(mode) for provider in family.providers
            if provider.ops is None or case.op in provider.ops]


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
    if {"family", "case", "provider"} <= set(metafunc.fixturenames):
        todo = generated(bench_mode(metafunc.config), torch.cuda.is_available())
        metafunc.parametrize("family, case, provider", todo,
                             ids=[f"{c.name}-{p.name}".replace(" ", "-") for _, c, p in todo])


@pytest.fixture(scope="session")
def copy_gbps():
    from bench import timing

    return timing.copy_bandwidth_gbps()
