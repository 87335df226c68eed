"""The reference itself, against closed forms and against a measured entropy change."""
import math

import pytest
import torch

import python_ref as ref


def test_uniform_row():
    V = 7
    s = ref.token_stats(torch.zeros(1, V, dtype=torch.float64), torch.tensor([3]))
    for got, want in ((s.entropy, math.log(V)), (s.logp, -math.log(V)), (s.lse, math.log(V)),
                      (s.p_target, 1 / V), (s.sum_p2, 1 / V), (s.sum_p2_logp, -math.log(V) / V)):
        assert got.item() == pytest.approx(want, rel=1e-12)


def test_two_point_row_and_temperature():
    a, T = 1.3, 0.5
    s = ref.token_stats(torch.tensor([[a, 0.0]], dtype=torch.float64), torch.tensor([1]), temperature=T)
    p = 1 / (1 + math.exp(-a / T))
    assert s.entropy.item() == pytest.approx(-(p * math.log(p) + (1 - p) * math.log(1 - p)), rel=1e-12)
    assert s.logp.item() == pytest.approx(math.log(1 - p), rel=1e-12)
    assert s.sum_p2.item() == pytest.approx(p * p + (1 - p) ** 2, rel=1e-12)


def test_neg_inf_entries_and_one_hot():
    x = torch.tensor([[0.0, float("-inf"), 0.0], [float("-inf"), 5.0, float("-inf")]],
                     dtype=torch.float64, requires_grad=True)
    s = ref.token_stats(x, torch.tensor([0, 1]))
    assert s.entropy.tolist() == pytest.approx([math.log(2), 0.0])
    assert s.logp.tolist() == pytest.approx([-math.log(2), 0.0])
    (s.entropy.sum() + s.logp.sum()).backward()
    assert torch.isfinite(x.grad).all()
    assert x.grad[0, 1] == 0 and x.grad[1].eq(0).all()


def test_ignored_rows_are_zero():
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    s = ref.token_stats(x, torch.tensor([1, -100, 4]))
    assert all(getattr(s, f)[1] == 0 for f in s._fields[:6])
    (s.logp.sum() + s.entropy.sum()).backward()
    assert x.grad[1].eq(0).all()


@pytest.mark.parametrize("kind", ["pg", "npg"])
def test_entropy_change_is_first_order(kind):
    """One step on the logits of a tabular softmax: the predicted change matches the measured one with
    an error that shrinks like the step squared."""
    g = torch.Generator().manual_seed(0)
    S, V = 32, 50
    z = torch.randn(S, V, generator=g, dtype=torch.float64)
    t = torch.randint(0, V, (S,), generator=g)
    adv = torch.randn(S, generator=g, dtype=torch.float64)
    before = ref.token_stats(z, t)
    p = before.logp.exp()
    direction = torch.nn.functional.one_hot(t, V).double()
    direction = direction - z.softmax(-1) if kind == "pg" else direction / p[:, None]
    errors = []
    # The natural-gradient step is lr * A / p_t on the target logit, ~V times larger: smaller lr.
    for lr in ((1e-2, 1e-3) if kind == "pg" else (1e-4, 1e-5)):
        measured = ref.token_stats(z + lr * adv[:, None] * direction, t).entropy - before.entropy
        predicted = ref.entropy_change(before, adv, kind=kind, lr=lr)
        errors.append((measured - predicted).abs().max().item())
        assert (measured - predicted).abs().max() < 0.05 * measured.abs().max()
    assert errors[0] / errors[1] == pytest.approx(100, rel=0.2)


def test_entropy_change_rejects_unknown_kind():
    s = ref.token_stats(torch.zeros(1, 3), torch.tensor([0]))
    with pytest.raises(ValueError, match="kind"):
        ref.entropy_change(s, torch.ones(1), kind="adam")
