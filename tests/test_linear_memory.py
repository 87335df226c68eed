"""The fused LM head's launchers: no [N, V] buffer anywhere (allocations tracked on the CPU), and the two
devices that bound memory and fill the machine, vocabulary chunks in the backward and vocabulary splits in
the forward, change nothing beyond rounding."""
import pytest
import torch

import covkernels as ck
import python_ref as ref
from covkernels.ops.lm_head.kernels import linear_bwd, linear_fwd
from covkernels.ops.lm_head.torch_path import linear_bwd_torch, linear_fwd_torch
from covkernels.ops.common import layout
from helpers import upstream
from test_linear import make_head, targets_for
from test_memory import AllocationLog
from bench.tolerances import assert_close_to_ref

N, D, V, CHUNK = 64, 8, 1200, 128
PATHS = {"triton": (linear_fwd, linear_bwd), "torch": (linear_fwd_torch, linear_bwd_torch)}


@pytest.fixture
def case():
    hidden, weight, bias = make_head("flat", N, D, V, torch.bfloat16)
    targets = targets_for(hidden, V)
    return hidden, weight, bias, targets, *upstream(targets.shape)


def _backward_bound(chunk_bytes, itemsize):
    """The largest buffer a backward may hold: one chunk of the logits' gradient, the fp32 accumulator of
    d_hidden, or the d_weight output."""
    return max(chunk_bytes, 4 * N * D, V * D * itemsize)


def test_triton_forward_allocates_only_row_vectors(case):
    hidden, weight, bias, targets, _, _ = case
    splits = 4
    with AllocationLog() as log:
        linear_fwd(hidden, weight, bias, targets, 1.0, -100, True, splits=splits)
    # Six fp32 per-split accumulators per row and six fp32 outputs per row (slack: a copy of the targets).
    assert sum(log.sizes) <= 24 * N * splits + 24 * N + 8 * N, log.sizes


def test_triton_backward_holds_one_vocabulary_chunk(case):
    hidden, weight, bias, targets, g_logp, g_ent = case
    out = linear_fwd_torch(hidden, weight, bias, targets, 1.0, -100, False)  # the same saved rows, faster
    with AllocationLog() as log:
        linear_bwd(hidden, weight, bias, targets, out[5], out[1], g_logp, g_ent, 1.0, -100,
                   chunk=CHUNK)
    itemsize = hidden.element_size()
    assert max(log.sizes) <= _backward_bound(N * CHUNK * itemsize, itemsize), log.sizes
    assert max(log.sizes) < N * V  # bytes: half of one bf16 [N, V] buffer


def test_torch_path_works_in_bounded_blocks(case, monkeypatch):
    hidden, weight, bias, targets, g_logp, g_ent = case
    monkeypatch.setattr(layout, "CHUNK_ELEMS", N * CHUNK)
    with AllocationLog() as log:
        out = linear_fwd_torch(hidden, weight, bias, targets, 1.0, -100, True)
        linear_bwd_torch(hidden, weight, bias, targets, out[5], out[1], g_logp, g_ent, 1.0, -100)
    itemsize = hidden.element_size()
    # Blocks of layout.CHUNK_ELEMS fp32 logits (or their gradient), never one [N, V] buffer.
    assert max(log.sizes) <= _backward_bound(4 * N * CHUNK, itemsize), log.sizes
    assert max(log.sizes) < N * V


def test_autograd_holds_no_logits(case):
    """Through the public function, forward and backward: no fp32 [N, V] anywhere (the logits are neither
    saved nor rebuilt whole); the backward's one chunk of dz has at most 8192 columns (documented)."""
    hidden, weight, bias, targets, g_logp, g_ent = case
    leaves = [x.detach().requires_grad_() for x in (hidden, weight, bias)]
    with AllocationLog() as fwd:
        logp, ent = ck.linear_logprobs_and_entropy(*leaves[:2], targets, bias=leaves[2], impl="triton")
    with AllocationLog() as bwd:
        torch.autograd.grad((logp, ent), leaves, (g_logp, g_ent))
    itemsize = hidden.element_size()
    assert max(fwd.sizes) < N * V, fwd.sizes
    assert max(bwd.sizes) <= _backward_bound(N * min(V, 8192) * itemsize, itemsize), bwd.sizes
    assert max(fwd.sizes + bwd.sizes) < N * V * 4


def _reference_gradients(hidden, weight, bias, targets, temperature, g_logp, g_ent, cast):
    h, w, b = (cast(x).requires_grad_() for x in (hidden, weight, bias))
    s = ref.linear_token_stats(h, w, targets, bias=b, temperature=temperature)
    return s, torch.autograd.grad((s.logp * g_logp + s.entropy * g_ent).sum(), (h, w, b))


@pytest.mark.parametrize("path, chunk", [*(("triton", c) for c in (None, 64, 100, 300, 1000)), ("torch", None)])
def test_backward_in_vocabulary_chunks_matches_reference(chunk, path):
    """V = 300 in chunks of 64 (the last one partial), 100 (not a power of two), exactly V, more than V (the
    Triton backward's vocabulary chunks; the PyTorch path has blocks of its own)."""
    fwd, bwd = PATHS[path]
    kw = {} if path == "torch" else dict(chunk=chunk)
    hidden, weight, bias = make_head("flat", 40, 24, 300, torch.bfloat16)
    targets = targets_for(hidden, 300)
    g_logp, g_ent = upstream(targets.shape)
    out = fwd(hidden, weight, bias, targets, 1 / 0.7, -100, False)
    saved = (out[5], out[1])  # lse2, entropy
    got = bwd(hidden, weight, bias, targets, *saved, g_logp, g_ent, 1 / 0.7, -100, **kw)
    _, want = _reference_gradients(hidden, weight, bias, targets, 0.7, g_logp, g_ent, lambda x: x.double())
    _, plain = _reference_gradients(hidden, weight, bias, targets, 0.7, g_logp, g_ent, lambda x: x.detach())
    names = ("d_hidden", "d_weight", "d_bias")
    for name, x, g, g64, glow in zip(names, (hidden, weight, bias), got, want, plain):
        assert g.dtype == x.dtype and g.shape == x.shape, name
        assert_close_to_ref(g, g64, glow, torch.bfloat16, "bwd", name)
    assert (got[0][targets == -100] == 0).all()


@pytest.mark.parametrize("path", PATHS)
def test_backward_computes_only_what_is_needed_and_the_same(path):
    """needs=(hidden, weight, bias): a subset gives the same gradients as all three (no bias: d_bias None)."""
    fwd, bwd = PATHS[path]
    hidden, weight, _ = make_head("flat", 24, 12, 200, torch.float32)
    targets = targets_for(hidden, 200)
    g_logp, g_ent = upstream(targets.shape)
    out = fwd(hidden, weight, None, targets, 1.0, -100, False)
    args = (hidden, weight, None, targets, out[5], out[1], g_logp, g_ent, 1.0, -100)
    kw = {} if path == "torch" else dict(chunk=64)
    full = bwd(*args, **kw)
    assert full[2] is None
    for needs in ((True, False, False), (False, True, False)):
        part = bwd(*args, needs=needs, **kw)
        for need, a, b in zip(needs, full, part):
            if need:
                assert torch.equal(a, b)


@pytest.mark.parametrize("splits", [1, 2, 3, 7])
def test_forward_split_over_programs_matches_reference(splits):
    """Few rows, the vocabulary split over programs; the first 500 columns banned by a -inf bias, so whole
    splits hold no probability."""
    hidden, weight, bias = make_head("flat", 6, 24, 1000, torch.bfloat16)
    bias[:500] = float("-inf")
    kept = targets_for(hidden, 500, ignore_every=4)
    targets = torch.where(kept == -100, -100, kept + 500)
    out = linear_fwd(hidden, weight, bias, targets, 1 / 1.3, -100, True, splits=splits)
    truth = ref.linear_token_stats(*(x.double() for x in (hidden, weight)), targets, bias=bias.double(),
                                   temperature=1.3)
    lowp = ref.linear_token_stats(hidden, weight, targets, bias=bias, temperature=1.3)
    for name, got in zip(("logp", "entropy", "lse", "sum_p2", "sum_p2_logp"), out):
        assert got.dtype == torch.float32 and got.shape == targets.shape, name
        assert_close_to_ref(got, getattr(truth, name), getattr(lowp, name), torch.bfloat16, "fwd", name)
