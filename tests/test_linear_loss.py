"""policy_loss straight from an LM head (hidden, weight, bias) against python_ref, and the fused LM head under
torch.compile(fullgraph=True)."""
import pytest
import torch

import covkernels as ck
import python_ref as ref
from helpers import make_logits, upstream
from test_linear import make_head, targets_for
from test_policy_loss import CENTERINGS, METHODS, SELECTIVE
from test_policy_loss_contract import NoHostSync
from bench.tolerances import assert_close_to_ref, max_err

B, T, D, V = 4, 12, 24, 67


def make_head_batch(dtype, seed=0):
    """An LM head with hidden [B, T, D] (rows of a wider buffer), and old_logp, advantages, mask as
    test_policy_loss.make_batch: one target ignored, one sequence without a valid token."""
    hidden = make_logits("padded", B * T, D, dtype, scale=1.0, seed=seed).view(B, T, D)
    _, weight, bias = make_head("flat", 2, D, V, dtype, scale=2.0, seed=seed)
    g = torch.Generator().manual_seed(seed + 7)
    targets = targets_for(hidden, V, ignore_every=0, seed=seed)
    targets[0, 3] = -100
    logp, _ = ref.linear_logprobs_and_entropy(hidden.double(), weight.double(), targets, bias=bias.double())
    old_logp = (logp + 0.4 * torch.randn(B, T, generator=g, dtype=torch.float64)).clamp(max=0).float()
    advantages = torch.randn(B, T, generator=g) * 1.5
    mask = torch.rand(B, T, generator=g) > 0.25
    mask[-1] = False
    return (hidden, weight, bias), targets, old_logp, advantages, mask


def run(lib, head, targets, old_logp, advantages, mask, seed=0, dtype=None, **kw):
    """(loss, metrics, gradients of hidden, weight, bias) of lib.policy_loss(lib.LMHead(...))."""
    cast = (lambda x: x.to(dtype)) if dtype else (lambda x: x)
    leaves = [cast(x).detach().requires_grad_() for x in head]
    loss, metrics = lib.policy_loss(lib.LMHead(*leaves), targets, cast(old_logp), cast(advantages), mask,
                                    generator=torch.Generator().manual_seed(seed), **kw)
    return loss.detach(), metrics, torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("centering", CENTERINGS)
@pytest.mark.parametrize("method", METHODS)
def test_matches_reference_float64(method, centering, agg):
    """In float64 both sides compute the same scores, so selections, losses and gradients agree."""
    batch = make_head_batch(torch.float64)
    kw = dict(method=method, centering=centering, loss_agg_mode=agg, **SELECTIVE)
    loss, metrics, grads = run(ck, *batch, dtype=torch.float64, **kw)
    want_loss, want_metrics, want_grads = run(ref, *batch, dtype=torch.float64, **kw)
    assert abs(loss.item() - want_loss.item()) <= 1e-12 * (1 + abs(want_loss.item()))
    for name, g, w in zip(("d_hidden", "d_weight", "d_bias"), grads, want_grads):
        assert max_err(g, w) <= 1e-12 * (1 + w.abs().max().item()), name
    assert metrics.keys() == want_metrics.keys()
    for k in metrics:
        assert abs(metrics[k].double().item() - want_metrics[k].double().item()) <= 1e-12, k
    if method != "ppo":
        assert metrics["n_selected"] > 1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("method", METHODS)
def test_matches_reference_low_precision(method, dtype):
    batch = make_head_batch(dtype, seed=3)
    kw = dict(method=method, centering="batch", **SELECTIVE)
    loss, metrics, grads = run(ck, *batch, **kw)
    truth = run(ref, *batch, dtype=torch.float64, **kw)
    lowp = run(ref, *batch, **kw)
    assert metrics["n_selected"] == truth[1]["n_selected"]
    assert_close_to_ref(loss, truth[0], lowp[0], dtype, "fwd", "loss")
    for name, g, g64, glow in zip(("d_hidden", "d_weight", "d_bias"), grads, truth[2], lowp[2]):
        assert g.dtype == dtype
        assert_close_to_ref(g, g64, glow, dtype, "bwd", name)


def test_same_loss_as_from_the_logits():
    """policy_loss(LMHead) is policy_loss of the logits F.linear would give (float64: to rounding)."""
    (hidden, weight, bias), *rest = make_head_batch(torch.float64)
    kw = dict(method="kl_cov", entropy_coef=0.01, kl_cov_ratio=0.1)
    loss, _ = ck.policy_loss(ck.LMHead(hidden, weight, bias), *rest, **kw)
    want, _ = ck.policy_loss(torch.nn.functional.linear(hidden, weight, bias), *rest, **kw)
    assert abs(loss.item() - want.item()) <= 1e-12 * (1 + abs(want.item()))


def test_loss_from_the_head_never_syncs_with_the_host():
    (hidden, weight, bias), *rest = make_head_batch(torch.bfloat16)
    leaves = [x.detach().requires_grad_() for x in (hidden, weight, bias)]
    with NoHostSync():
        loss, _ = ck.policy_loss(ck.LMHead(*leaves), *rest, method="kl_cov", validate=False,
                                 generator=torch.Generator().manual_seed(0), **SELECTIVE)
        loss.backward()
    assert all(x.grad is not None and torch.isfinite(x.grad).all() for x in leaves)


@pytest.mark.parametrize("kw", [dict(clamp_fraction=0.3), dict(clamp_fraction=0.3, aent_coef=1e-3)],
                         ids=["clamp_fraction", "aent"])
def test_clamped_entropy_is_refused_for_a_head(kw):
    """AEnt needs whole rows of logits (a sort), which the fused head never holds."""
    (hidden, weight, bias), *rest = make_head_batch(torch.float32)
    with pytest.raises(ValueError, match="clamp_fraction"):
        ck.policy_loss(ck.LMHead(hidden, weight, bias), *rest, **kw)


def test_head_with_hidden_not_b_t_d_is_refused():
    (hidden, weight, bias), targets, *rest = make_head_batch(torch.float32)
    with pytest.raises(ValueError, match="hidden"):
        ck.policy_loss(ck.LMHead(hidden.reshape(B * T, D), weight, bias), targets, *rest)


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("fn", ["logprobs", "token_stats"])
def test_compiled_matches_eager(fn, impl):
    hidden, weight, bias = make_head("bt", 8, 16, 120, torch.bfloat16)
    targets = targets_for(hidden, 120)
    g_logp, g_ent = upstream(targets.shape)

    def loss(h, w, b):
        if fn == "logprobs":  # validate=True (the default) must skip its host-syncing check while tracing
            logp, ent = ck.linear_logprobs_and_entropy(h, w, targets, bias=b, temperature=0.8, impl=impl)
            return (logp * g_logp + ent * g_ent).sum()
        s = ck.linear_token_stats(h, w, targets, bias=b, temperature=0.8, validate=False, impl=impl)
        return (s.logp * g_logp + s.entropy * g_ent).sum() + s.sum_p2.sum() + s.lse.sum()

    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    results = []
    for f in (loss, compiled):
        leaves = [x.detach().requires_grad_() for x in (hidden, weight, bias)]
        value = f(*leaves)
        results.append((value.detach(), *torch.autograd.grad(value, leaves)))
    for name, a, b in zip(("value", "d_hidden", "d_weight", "d_bias"), *results):
        assert torch.equal(a, b), name


def test_compiled_policy_loss_from_a_head():
    (hidden, weight, bias), *rest = make_head_batch(torch.bfloat16)
    kw = dict(method="kl_cov", validate=False, **SELECTIVE)

    def loss(h, w, b):
        return ck.policy_loss(ck.LMHead(h, w, b), *rest, **kw)[0]

    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    results = []
    for f in (loss, compiled):
        leaves = [x.detach().requires_grad_() for x in (hidden, weight, bias)]
        value = f(*leaves)
        results.append((value.detach(), *torch.autograd.grad(value, leaves)))
    for name, a, b in zip(("loss", "d_hidden", "d_weight", "d_bias"), *results):
        assert torch.equal(a, b), name
