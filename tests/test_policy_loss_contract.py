"""policy_loss as a trainer uses it: no host sync, compiles whole, clear errors, schedules, the module."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import covkernels as ck
from covkernels import schedules
from test_policy_loss import METHODS, SELECTIVE, make_batch, run

# What .item(), bool(t), int(t), .tolist() and boolean indexing dispatch to: each waits for the device.
SYNCING_OPS = ("aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.item")


class NoHostSync(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(str(func).startswith(name) for name in SYNCING_OPS):
            raise AssertionError(f"host synchronisation: {func}")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("centering", ["batch", "state"])
@pytest.mark.parametrize("method", METHODS)
def test_loss_path_never_syncs_with_the_host(method, centering):
    logits, targets, old_logp, advantages, mask = make_batch()
    x = logits.clone().requires_grad_()
    with NoHostSync():
        loss, metrics = ck.policy_loss(x, targets, old_logp, advantages, mask, method=method, centering=centering,
                                       validate=False, generator=torch.Generator().manual_seed(0), **SELECTIVE)
        loss.backward()
    assert x.grad is not None and torch.isfinite(loss)


def test_the_sync_detector_detects():
    with pytest.raises(AssertionError, match="host synchronisation"), NoHostSync():
        torch.ones(3).sum().item()
    with pytest.raises(AssertionError, match="host synchronisation"), NoHostSync():
        ck.policy_loss(*make_batch(), validate=True)


@pytest.mark.parametrize("method", METHODS)
def test_whole_loss_compiles_without_graph_breaks(method):
    batch = make_batch()
    kw = dict(method=method, centering="state", validate=False, **SELECTIVE)

    def step(x, *rest):
        loss, metrics = ck.policy_loss(x, *rest, **kw)
        return loss, metrics["n_selected"]

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (step, compiled):
        x = batch[0].clone().requires_grad_()
        torch.manual_seed(0)
        loss, n = fn(x, *batch[1:])
        loss.backward()
        results.append((loss.detach(), n, x.grad))
    (l1, n1, g1), (l2, n2, g2) = results
    assert n1 == n2 and torch.allclose(l1, l2, atol=1e-6) and torch.allclose(g1, g2, atol=1e-6)


BAD = [
    ("method", dict(method="grpo"), ValueError),
    ("centering", dict(centering="token"), ValueError),
    ("loss_agg_mode", dict(loss_agg_mode="mean"), ValueError),
    ("clip_cov_ratio", dict(clip_cov_ratio=-0.1), ValueError),
    ("kl_cov_ratio", dict(kl_cov_ratio=-1e-4), ValueError),
    ("clip_ratio", dict(clip_ratio=-0.2), ValueError),
    ("clip_cov_lb", dict(clip_cov_lb=5.0, clip_cov_ub=1.0), ValueError),
    ("clip_ratio_c", dict(clip_ratio_c=1.0), ValueError),
    ("temperature", dict(temperature=0.0), ValueError),
]


@pytest.mark.parametrize("name,kw,exc", BAD, ids=[b[0] for b in BAD])
def test_bad_hyperparameters_name_the_argument(name, kw, exc):
    with pytest.raises(exc, match=name):
        ck.policy_loss(*make_batch(), **kw)


@pytest.mark.parametrize("bad", ["old_logp_positive", "old_logp_nan", "advantages_inf", "target_range",
                                 "mask_shape", "adv_shape", "logits_2d"])
def test_bad_tensors_raise_before_any_launch(bad, monkeypatch):
    logits, targets, old_logp, advantages, mask = make_batch()
    monkeypatch.setattr("covkernels.ops.fused_pass.op.fused_fwd", _no_launch)
    monkeypatch.setattr("covkernels.ops.fused_pass.op.fused_fwd_torch", _no_launch)
    mask[0, 0] = True
    if bad == "old_logp_positive":
        old_logp[0, 0], match = 0.5, "old_logp"
    elif bad == "old_logp_nan":
        old_logp[0, 0], match = float("nan"), "old_logp"
    elif bad == "advantages_inf":
        advantages[0, 0], match = float("inf"), "advantages"
    elif bad == "target_range":
        targets[0, 0], match = logits.shape[-1], "targets"
    elif bad == "mask_shape":
        mask, match = mask[:, :-1], "response_mask"
    elif bad == "adv_shape":
        advantages, match = advantages[:, :-1], "advantages"
    else:
        logits, match = logits[0], "logits"
    with pytest.raises(ValueError, match=match):
        ck.policy_loss(logits, targets, old_logp, advantages, mask)


def _no_launch(*args, **kwargs):
    raise AssertionError("kernel launched before validation")


def test_padding_garbage_never_reaches_loss_or_gradient():
    logits, targets, old_logp, advantages, mask = make_batch()
    old_logp[~mask], advantages[~mask] = float("nan"), float("inf")
    logits[~mask] = float("nan")
    loss, metrics, grad = run(ck, logits, targets, old_logp, advantages, mask, method="clip_cov",
                              validate=True, **SELECTIVE)
    assert torch.isfinite(loss) and torch.isfinite(grad).all() and (grad[~mask] == 0).all()
    assert all(torch.isfinite(v) for v in metrics.values())


def test_policy_loss_module_evaluates_schedules_at_step():
    batch = make_batch()
    module = ck.PolicyLoss("kl_cov", kl_cov_ratio=0.2, ppo_kl_coef=schedules.linear(1.0, 0.0, steps=10),
                           entropy_coef=schedules.cosine(0.1, 0.0, steps=10))
    assert "kl_cov" in repr(module)
    for step, beta, alpha in ((0, 1.0, 0.1), (5, 0.5, 0.05), (10, 0.0, 0.0), (50, 0.0, 0.0)):
        got, _ = module(*batch, step=step)
        want, _ = ck.policy_loss(*batch, method="kl_cov", kl_cov_ratio=0.2, ppo_kl_coef=beta, entropy_coef=alpha)
        assert torch.allclose(got, want, atol=1e-7), step
    with pytest.raises(ValueError, match="method"):
        ck.PolicyLoss("sac")
    with pytest.raises(ValueError, match="kl_cov_ratio"):
        ck.PolicyLoss("kl_cov", kl_cov_ratio=schedules.linear(-1.0, 0.0, steps=3))


@pytest.mark.parametrize("name,value", [("entropy_coef", torch.tensor(0.1)), ("ppo_kl_coef", float("nan")),
                                        ("entropy_coef", "0.1")])
def test_coefficients_must_be_python_numbers(name, value):
    with pytest.raises(TypeError, match=name):
        ck.policy_loss(*make_batch(), **{name: value})
