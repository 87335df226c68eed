"""Test set-up: Triton's interpreter on machines without a GPU, and NaN-poisoned allocations."""
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
from hypothesis import HealthCheck, settings

# Bounded in CI; `make fuzz` (HYPOTHESIS_PROFILE=fuzz) runs every property test 600 times, 2,400 cases.
settings.register_profile("ci", max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("fuzz", max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Must be set before covkernels (and so any @triton.jit function) is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Inductor's on-disk cache does not key on a custom op's schema: graphs compiled against an older
# covkernels op signature would be replayed. Each test session compiles afresh.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="covkernels-inductor-"))

_empty, _empty_like = torch.empty, torch.empty_like


def _poison(t):
    if t.is_floating_point():
        t.fill_(float("nan"))
    return t


@pytest.fixture(autouse=True)
def poison_allocations(monkeypatch):
    """Every torch.empty / empty_like returns NaN, so an output element a kernel forgot fails a test."""
    monkeypatch.setattr(torch, "empty", lambda *a, **k: _poison(_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: _poison(_empty_like(*a, **k)))


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="run the larger interpreter cases")


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    skip_slow = pytest.mark.skip(reason="larger interpreter case: pass --runslow")
    for item in items:
        if item.module.__name__.startswith("test_integration"):
            item.add_marker(pytest.mark.peers)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        if "slow" in item.keywords and not config.getoption("--runslow"):
            item.add_marker(skip_slow)


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    """A gloo group of this process alone: the vocabulary-parallel ops with one shard of the whole row."""
    path = tmp_path_factory.mktemp("one_rank") / "init"
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()
