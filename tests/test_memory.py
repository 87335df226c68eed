"""Memory by construction: the forward allocates O(N), the backward one gradient (none in place)."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import covkernels as ck
from covkernels.ops.fused_pass.kernels import fused_bwd, fused_fwd
from covkernels.ops.fused_pass.torch_path import fused_bwd_torch, fused_fwd_torch
from covkernels.ops.common import layout
from helpers import make_logits, make_targets, upstream

N_ROWS, V = 64, 5000


class AllocationLog(TorchDispatchMode):
    """Records the size in bytes of every new storage an op returns (views of inputs do not count)."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.sizes.append(t.untyped_storage().nbytes())
        return out


@pytest.fixture
def case():
    logits = make_logits("sliced", N_ROWS, V, torch.bfloat16)
    targets = make_targets(logits)
    return logits, targets, *upstream(targets.shape)


def test_triton_launchers_allocate_only_row_vectors(case):
    logits, targets, g_logp, g_ent = case
    with AllocationLog() as fwd:
        logp, ent, lse, _, _, lse2 = fused_fwd(logits, targets, 1.0, -100, True, splits=3)
    with AllocationLog() as bwd:
        fused_bwd(logits, targets, lse2, ent, g_logp, g_ent, 1.0, -100, logits)
    # Outputs and the [5, N, splits] partials: O(N) bytes, nothing near one row-block of logits.
    assert max(fwd.sizes) <= 5 * N_ROWS * 3 * 4 and sum(fwd.sizes) <= 32 * N_ROWS * 4
    assert sum(bwd.sizes) <= 2 * N_ROWS * 4


def test_torch_path_works_in_bounded_blocks(case, monkeypatch):
    logits, targets, g_logp, g_ent = case
    monkeypatch.setattr(layout, "CHUNK_ELEMS", 4 * V)
    with AllocationLog() as log:
        _, ent, lse, _, _, lse2 = fused_fwd_torch(logits, targets, 1.0, -100, True)
        fused_bwd_torch(logits, targets, lse2, ent, g_logp, g_ent, 1.0, -100, logits)
    # Never more than one fp32 block of 4 rows at a time: far below one [N, V] fp32 copy.
    assert max(log.sizes) <= 4 * V * 4
    assert max(log.sizes) * 8 < N_ROWS * V * 4


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("inplace", [False, True])
def test_autograd_allocates_one_gradient_or_none(case, impl, inplace):
    logits, targets, g_logp, g_ent = case
    # A non-leaf, as logits are in a trainer (a leaf's .grad may not alias its data, so it is copied).
    x = logits.clone().requires_grad_() * 1.0
    with AllocationLog() as log:
        logp, ent = ck.logprobs_and_entropy(x, targets, impl=impl, inplace_backward=inplace)
        torch.autograd.grad((logp, ent), x, (g_logp, g_ent))
    big = [s for s in log.sizes if s >= N_ROWS * V]
    assert big == ([] if inplace else [logits.numel() * logits.element_size()])
