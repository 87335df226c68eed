"""The LM-head reference itself: closed forms, and agreement (values and gradients) with the explicit
two-step computation logits = hidden @ weight.T + bias, then token_stats / policy_loss."""
import math
import types

import pytest
import torch

import python_ref as ref

F64 = torch.float64
D, V = 7, 127


def lm_head(lead=(3, 5), bias=True, seed=0, dtype=F64):
    """hidden [*lead, D], weight [V, D], bias [V] or None, targets [*lead] with one ignored row."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*lead, D, generator=g, dtype=F64).to(dtype)
    weight = torch.randn(V, D, generator=g, dtype=F64).to(dtype)
    b = torch.randn(V, generator=g, dtype=F64).to(dtype) if bias else None
    targets = torch.randint(0, V, lead, generator=g)
    targets.view(-1)[1] = -100
    return hidden, weight, b, targets


def explicit_stats(hidden, weight, bias, targets, **kw):
    logits = hidden @ weight.T + (0 if bias is None else bias)
    return ref.token_stats(logits, targets, **kw)


def grads(fn, tensors, upstream):
    """Gradients of sum_k <fn(*tensors)[k], upstream[k]> with respect to each tensor that is not None."""
    leaves = [None if x is None else x.detach().clone().requires_grad_(True) for x in tensors]
    outs = fn(*leaves)
    inputs = [x for x in leaves if x is not None]
    total = sum((o * u).sum() for o, u in zip(outs, upstream))
    return [o.detach() for o in outs], torch.autograd.grad(total, inputs)


@pytest.mark.parametrize("temperature", [1.0, 0.3], ids=lambda v: f"T={v}")
@pytest.mark.parametrize("bias", [None, 2.5], ids=["no_bias", "const_bias"])
def test_zero_weight_is_uniform(bias, temperature):
    hidden, _, _, targets = lm_head()
    weight = torch.zeros(V, D, dtype=F64)
    b = None if bias is None else torch.full((V,), bias, dtype=F64)
    s = ref.linear_token_stats(hidden, weight, targets, bias=b, temperature=temperature)
    valid = targets != -100
    torch.testing.assert_close(s.entropy[valid], torch.full_like(s.entropy[valid], math.log(V)))
    torch.testing.assert_close(s.logp[valid], torch.full_like(s.logp[valid], -math.log(V)))
    torch.testing.assert_close(s.sum_p2[valid], torch.full_like(s.sum_p2[valid], 1 / V))


def test_two_point_head_and_temperature():
    """logits [a, 0] from hidden [a], weight [[1], [0]]: p = sigmoid(a / T) in closed form."""
    a, T = 1.3, 0.5
    hidden = torch.tensor([[a]], dtype=F64)
    weight = torch.tensor([[1.0], [0.0]], dtype=F64)
    logp, entropy = ref.linear_logprobs_and_entropy(hidden, weight, torch.tensor([1]), temperature=T)
    p = 1 / (1 + math.exp(-a / T))
    assert entropy.item() == pytest.approx(-(p * math.log(p) + (1 - p) * math.log(1 - p)), rel=1e-12)
    assert logp.item() == pytest.approx(math.log(1 - p), rel=1e-12)


@pytest.mark.parametrize("temperature", [1.0, 0.7], ids=lambda v: f"T={v}")
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("lead", [(3, 5), (11,)], ids=["3x5", "11"])
def test_matches_token_stats_of_explicit_logits(lead, bias, temperature):
    hidden, weight, b, targets = lm_head(lead, bias)
    got = ref.linear_token_stats(hidden, weight, targets, bias=b, temperature=temperature)
    want = explicit_stats(hidden, weight, b, targets, temperature=temperature)
    assert got.clamped_entropy is None
    for name in got._fields[:6]:
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=1e-12, atol=1e-12, msg=name)
    logp, entropy = ref.linear_logprobs_and_entropy(hidden, weight, targets, bias=b, temperature=temperature)
    assert torch.equal(logp, got.logp) and torch.equal(entropy, got.entropy)


def test_temperature_is_a_scaled_head():
    hidden, weight, b, targets = lm_head()
    T = 0.6
    scaled = ref.linear_token_stats(hidden, weight, targets, bias=b, temperature=T)
    divided = ref.linear_token_stats(hidden, weight / T, targets, bias=b / T)
    torch.testing.assert_close(scaled.logp, divided.logp)
    torch.testing.assert_close(scaled.entropy, divided.entropy)


def test_computes_in_the_input_dtype():
    hidden, weight, b, targets = lm_head(dtype=torch.bfloat16)
    logp, entropy = ref.linear_logprobs_and_entropy(hidden, weight, targets, bias=b)
    assert logp.dtype == entropy.dtype == torch.bfloat16
    want = ref.token_stats(torch.nn.functional.linear(hidden, weight, b), targets)
    assert torch.equal(logp, want.logp) and torch.equal(entropy, want.entropy)


@pytest.mark.parametrize("temperature", [1.0, 0.7], ids=lambda v: f"T={v}")
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_gradients_match_two_step(bias, temperature):
    hidden, weight, b, targets = lm_head(bias=bias)
    g = torch.Generator().manual_seed(1)
    upstream = [torch.randn(targets.shape, generator=g, dtype=F64) for _ in range(2)]

    def fused(h, w, bb):
        return ref.linear_logprobs_and_entropy(h, w, targets, bias=bb, temperature=temperature)

    def two_step(h, w, bb):
        s = explicit_stats(h, w, bb, targets, temperature=temperature)
        return s.logp, s.entropy
    _, got = grads(fused, (hidden, weight, b), upstream)
    _, want = grads(two_step, (hidden, weight, b), upstream)
    assert len(got) == (3 if bias else 2)
    for name, x, y in zip(("hidden", "weight", "bias"), got, want):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12, msg=name)


def test_ignored_rows_are_zero_with_zero_gradient():
    hidden, weight, b, targets = lm_head()
    targets[2, 3] = -100
    ignored = targets == -100
    g = torch.Generator().manual_seed(2)
    upstream = [torch.randn(targets.shape, generator=g, dtype=F64) for _ in range(2)]

    def fused(h, w, bb):
        return ref.linear_logprobs_and_entropy(h, w, targets, bias=bb)
    (logp, entropy), (g_hidden, g_weight, g_bias) = grads(fused, (hidden, weight, b), upstream)
    s = ref.linear_token_stats(hidden, weight, targets, bias=b)
    assert ignored.sum() == 2
    assert all(getattr(s, name)[ignored].eq(0).all() for name in s._fields[:6])
    assert logp[ignored].eq(0).all() and entropy[ignored].eq(0).all()
    assert g_hidden[ignored].eq(0).all() and g_hidden[~ignored].abs().sum(-1).gt(0).all()
    # The weight and bias gradients are those of the valid rows alone.
    valid = ~ignored

    def valid_only(h, w, bb):
        return ref.linear_logprobs_and_entropy(h, w, targets[valid], bias=bb)
    _, (_, g_weight_valid, g_bias_valid) = grads(valid_only, (hidden[valid], weight, b),
                                                 [u[valid] for u in upstream])
    torch.testing.assert_close(g_weight, g_weight_valid, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_bias, g_bias_valid, rtol=1e-12, atol=1e-12)


# --- policy_loss with an LM head -------------------------------------------------------------------------

@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("method", ["ppo", "clip_cov", "kl_cov"])
def test_policy_loss_of_lm_head_equals_explicit_logits(method, bias):
    hidden, weight, b, targets = lm_head(bias=bias, seed=3)
    g = torch.Generator().manual_seed(4)
    old = -3 * torch.rand(targets.shape, generator=g, dtype=F64)
    adv = torch.randn(targets.shape, generator=g, dtype=F64)
    mask = torch.rand(targets.shape, generator=g) < 0.8
    # Wide bounds and large ratios so that Clip-Cov and KL-Cov select some tokens.
    kw = {"method": method, "temperature": 0.7, "entropy_coef": 0.01, "clip_cov_ratio": 0.2,
          "clip_cov_lb": -50.0, "clip_cov_ub": 50.0, "kl_cov_ratio": 0.2}

    def run(make_input):
        metrics = {}

        def fn(h, w, bb):
            loss, m = ref.policy_loss(make_input(h, w, bb), targets, old, adv, mask,
                                      generator=torch.Generator().manual_seed(0), **kw)
            metrics.update(m)
            return (loss,)
        (loss,), gs = grads(fn, (hidden, weight, b), [torch.ones((), dtype=F64)])
        return loss, gs, metrics

    def explicit(h, w, bb):
        return h @ w.T + (0 if bb is None else bb)
    loss, g_head, m_head = run(ref.LMHead)
    want, g_explicit, m_explicit = run(explicit)
    # Any object with hidden, weight and bias attributes is an LM head.
    duck, g_duck, _ = run(lambda h, w, bb: types.SimpleNamespace(hidden=h, weight=w, bias=bb))
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-12)
    assert torch.equal(duck, loss)
    for x, y, z in zip(g_head, g_explicit, g_duck):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)
        assert torch.equal(x, z)
    assert m_head.keys() == m_explicit.keys()
    for name in m_head:
        torch.testing.assert_close(m_head[name], m_explicit[name], rtol=1e-12, atol=1e-12, msg=name)
    assert (m_head["n_selected"] > 0) == (method != "ppo")


@pytest.mark.parametrize("shape", [(15, D), (1, 3, 5, D)], ids=["2d", "4d"])
def test_policy_loss_lm_head_shape_error_names_hidden(shape):
    hidden = torch.zeros(shape, dtype=F64)
    targets = torch.zeros(3, 5, dtype=torch.long)
    args = (targets, -torch.ones(3, 5, dtype=F64), torch.ones(3, 5, dtype=F64), torch.ones(3, 5))
    with pytest.raises(ValueError, match=r"hidden must be \[B, T, D\]"):
        ref.policy_loss(ref.LMHead(hidden, torch.zeros(V, D, dtype=F64)), *args)
