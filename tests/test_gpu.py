"""Realistic shapes on a GPU, without the interpreter (skipped on machines without CUDA)."""
import pytest
import torch

import covkernels as ck
import python_ref as ref

pytestmark = pytest.mark.gpu


def _stats_in_float64(logits, targets, rows):
    return ref.token_stats(logits[rows].double(), targets[rows])


@pytest.mark.parametrize("N,V", [(16384, 151936), (4096, 128256), (64, 151936), (8, 32000)])
def test_realistic_shapes_match_reference(N, V):
    """N * V above 2^31 at the first shape: every offset must be 64-bit. Few rows use the split path."""
    g = torch.Generator(device="cuda").manual_seed(0)
    logits = (torch.randn(N, V, device="cuda", generator=g) * 3).to(torch.bfloat16)
    targets = torch.randint(0, V, (N,), device="cuda", generator=g)
    targets[1::7] = -100
    stats = ck.token_stats(logits, targets)
    rows = torch.cat([torch.arange(0, min(N, 32)), torch.arange(max(N - 32, 0), N)]).cuda()
    truth = _stats_in_float64(logits, targets, rows)
    for f in stats._fields[:6]:
        err = (getattr(stats, f)[rows].double() - getattr(truth, f)).abs().max().item()
        assert err < 5e-5 * (1 + getattr(truth, f).abs().max().item()), f
    g_logp = torch.randn(N, device="cuda", generator=g)
    g_ent = torch.randn(N, device="cuda", generator=g)
    x = logits.requires_grad_()
    logp, ent = ck.logprobs_and_entropy(x, targets)
    (grad,) = torch.autograd.grad((logp * g_logp + ent * g_ent).sum(), x)
    x64 = logits.detach()[rows].double().requires_grad_()
    t = ref.token_stats(x64, targets[rows])
    (want,) = torch.autograd.grad((t.logp * g_logp[rows] + t.entropy * g_ent[rows]).sum(), x64)
    assert (grad[rows].double() - want).abs().max().item() <= 2**-8 * (1 + want.abs().max().item())
    assert (grad[-1] if targets[-1] != -100 else grad[-2]).abs().sum() > 0  # the last rows were written


def test_deterministic_and_sync_free():
    logits = torch.randn(512, 50257, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, 50257, (512,), device="cuda")
    outs = []
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            logp, ent = ck.logprobs_and_entropy(logits, targets, validate=False)
            (grad,) = torch.autograd.grad(logp.sum() + ent.sum(), logits)
            outs.append((logp, ent, grad))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for a, b in zip(*outs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_clamped_entropy_compiled_kernels(dtype):
    """The radix-select threshold (tl.histogram of uint32 keys' digits, select.DIGIT_BITS wide) compiled for
    real, ties included."""
    g = torch.Generator(device="cuda").manual_seed(1)
    N, V = 1024, 151936
    logits = (torch.randn(N, V, device="cuda", generator=g) * 2).to(dtype)
    logits[:8] = logits[:8].float().round().to(dtype)  # heavy ties at the threshold
    targets = torch.randint(0, V, (N,), device="cuda", generator=g)
    x = logits.clone().requires_grad_()
    s = ck.token_stats(x, targets, clamp_fraction=0.3)
    g_c = torch.randn(N, device="cuda", generator=g)
    (grad,) = torch.autograd.grad((s.clamped_entropy * g_c).sum(), x)
    rows = torch.cat([torch.arange(0, 16), torch.arange(N - 8, N)]).cuda()
    x64 = logits[rows].double().requires_grad_()
    want = ref.token_stats(x64, targets[rows], clamp_fraction=0.3)
    (want_grad,) = torch.autograd.grad((want.clamped_entropy * g_c[rows]).sum(), x64)
    assert (s.clamped_entropy[rows].double() - want.clamped_entropy).abs().max() < 5e-5
    assert (grad[rows].double() - want_grad).abs().max() <= 2**-7 * (1 + want_grad.abs().max().item())


def _lm_head_inputs(N, D, V, dtype, seed=2):
    g = torch.Generator(device="cuda").manual_seed(seed)
    hidden = (torch.randn(N, D, device="cuda", generator=g)).to(dtype)
    weight = (torch.randn(V, D, device="cuda", generator=g) * D**-0.5 * 3).to(dtype)
    targets = torch.randint(0, V, (N,), device="cuda", generator=g)
    targets[3::11] = -100
    return hidden, weight, targets, g


@pytest.mark.parametrize("N,D,V,dtype", [(16384, 4096, 151936, torch.bfloat16), (300, 1000, 50257, torch.float16),
                                         (77, 128, 32001, torch.float32)], ids=str)
def test_lm_head_compiled_kernels_match_reference(N, D, V, dtype):
    """tl.dot tiles compiled for real (wgmma on Hopper), autotuned; N * V above 2^31 at the first shape.
    Forward and the three gradients on sampled rows against float64; memory: no [N, V] buffer."""
    hidden, weight, targets, g = _lm_head_inputs(N, D, V, dtype)
    g_logp = torch.randn(N, device="cuda", generator=g)
    g_ent = torch.randn(N, device="cuda", generator=g)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    for warm in (True, False):  # the first call autotunes (and allocates the autotuner's own buffers)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        stats = ck.linear_token_stats(h, w, targets, temperature=0.9)
        d_h, d_w = torch.autograd.grad((stats.logp * g_logp + stats.entropy * g_ent).sum(), (h, w))
        if warm:
            del stats, d_h, d_w
    extra = torch.cuda.max_memory_allocated() - base - d_h.nbytes - d_w.nbytes
    assert extra < 0.05 * N * V * hidden.element_size() or N * V < 2**31, f"extra memory {extra / 2**20:.0f} MiB"
    rows = torch.cat([torch.arange(0, 16), torch.arange(N - 16, N)]).cuda()
    z = (hidden[rows].double() @ weight.double().T).requires_grad_()
    truth = ref.token_stats(z, targets[rows], temperature=0.9)
    for f in stats._fields[:6]:
        err = (getattr(stats, f)[rows].double() - getattr(truth, f)).abs().max().item()
        assert err < 1e-4 * (1 + getattr(truth, f).abs().max().item()), f
    (dz,) = torch.autograd.grad((truth.logp * g_logp[rows] + truth.entropy * g_ent[rows]).sum(), z)
    want_h = dz @ weight.double()
    tol = {torch.bfloat16: 2**-7, torch.float16: 2**-9, torch.float32: 1e-5}[dtype]
    assert (d_h[rows].double() - want_h).abs().max().item() <= tol * (1 + want_h.abs().max().item())
    # d_weight sums over every row: check it against the unfused product in float64 on a few columns.
    cols = torch.tensor([0, 1, V // 2, V - 1], device="cuda")
    z_all = (hidden.double() @ weight[cols].double().T)
    logp_all = z_all / 0.9 - stats.lse.double()[:, None]
    p = logp_all.exp()
    valid = (targets != -100).double()[:, None]
    dzc = (g_logp[:, None] * ((targets[:, None] == cols[None, :]).double() - p)
           - g_ent[:, None] * p * (logp_all + stats.entropy.double()[:, None])) / 0.9 * valid
    want_w = dzc.T @ hidden.double()
    assert (d_w[cols].double() - want_w).abs().max().item() <= tol * (1 + want_w.abs().max().item())


def test_lm_head_deterministic_and_sync_free():
    hidden, weight, targets, _ = _lm_head_inputs(1024, 512, 50257, torch.bfloat16)
    h, w = hidden.requires_grad_(), weight.requires_grad_()
    outs = []
    logp, ent = ck.linear_logprobs_and_entropy(h, w, targets, validate=False)  # autotuning syncs, once
    torch.autograd.grad(logp.sum() + ent.sum(), (h, w))
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            logp, ent = ck.linear_logprobs_and_entropy(h, w, targets, validate=False)
            outs.append((logp, ent, *torch.autograd.grad(logp.sum() + ent.sum(), (h, w))))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for a, b in zip(*outs):
        assert torch.equal(a, b)
