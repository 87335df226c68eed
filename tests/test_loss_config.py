"""LossConfig: every field checked by name, schedules read at a step, and a config giving exactly what the
same keywords give in policy_loss, token_loss, PolicyLoss and CovSelection.build."""
import copy
import dataclasses
import pickle

import pytest
import torch

import covkernels as ck
from covkernels import LossConfig, schedules
from covkernels.distributed import CovSelection
from test_policy_loss import METHODS, SELECTIVE, make_batch

FIELDS = [f.name for f in dataclasses.fields(LossConfig)]


@pytest.mark.parametrize("kw, error, name", [
    (dict(method="sac"), ValueError, "method"),
    (dict(centering="token"), ValueError, "centering"),
    (dict(loss_agg_mode="mean"), ValueError, "loss_agg_mode"),
    (dict(clip_ratio=-0.1), ValueError, "clip_ratio"),
    (dict(clip_ratio_low="0.2"), TypeError, "clip_ratio_low"),
    (dict(clip_ratio_high=-1.0), ValueError, "clip_ratio_high"),
    (dict(clip_ratio=None, clip_ratio_low=0.2), ValueError, "clip_ratio"),
    (dict(clip_ratio_c=1.0), ValueError, "clip_ratio_c"),
    (dict(clip_ratio_c="3"), TypeError, "clip_ratio_c"),
    (dict(clip_cov_ratio=-1e-4), ValueError, "clip_cov_ratio"),
    (dict(clip_cov_ratio=torch.tensor(0.1)), TypeError, "clip_cov_ratio"),
    (dict(clip_cov_lb=5.0, clip_cov_ub=1.0), ValueError, "clip_cov_lb"),
    (dict(clip_cov_ub=None), TypeError, "clip_cov_ub"),
    (dict(kl_cov_ratio=schedules.linear(-1.0, 0.0, 3)), ValueError, "kl_cov_ratio"),
    (dict(ppo_kl_coef=-1.0), ValueError, "ppo_kl_coef"),
    (dict(ppo_kl_coef=float("nan")), TypeError, "ppo_kl_coef"),
    (dict(entropy_coef=torch.tensor(0.1)), TypeError, "entropy_coef"),
    (dict(entropy_coef=float("inf")), TypeError, "entropy_coef"),
    (dict(aent_coef=-1e-3, clamp_fraction=0.3), ValueError, "aent_coef"),
    (dict(aent_coef=1e-3), ValueError, "clamp_fraction"),
    (dict(aent_coef=schedules.linear(0.0, 1e-3, 10)), ValueError, "clamp_fraction"),
    (dict(clamp_fraction=1.0), ValueError, "clamp_fraction"),
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(temperature=1e-40), ValueError, "temperature"),
    (dict(ignore_index=-100.0), TypeError, "ignore_index"),
    (dict(validate=1), TypeError, "validate"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_every_bad_field_is_named(kw, error, name):
    with pytest.raises(error, match=name):
        LossConfig(**kw)
    with pytest.raises(error, match=name):  # the same check, before any kernel, as a keyword of the call
        ck.policy_loss(*make_batch(), **kw)


def test_unknown_keyword_and_config_type_are_named():
    with pytest.raises(TypeError, match="kl_cov_raito"):
        ck.policy_loss(*make_batch(), kl_cov_raito=0.1)
    with pytest.raises(TypeError, match="config must be a LossConfig"):
        ck.policy_loss(*make_batch(), {"method": "kl_cov"})
    with pytest.raises(TypeError, match="positional"):
        LossConfig("ppo", 0.2)  # every field but method by name


def test_schedules_are_read_at_step():
    ctl = ck.AEntController(coef=1e-3)
    config = LossConfig("kl_cov", entropy_coef=schedules.linear(0.1, 0.0, 10),
                        kl_cov_ratio=schedules.cosine(0.2, 0.0, 10), ppo_kl_coef=lambda step: 1.0 / (1 + step),
                        aent_coef=ctl)
    assert config.clamp_fraction == ctl.clamp_fraction  # the controller's p
    for step in (0, 5, 10, 20):
        at = config.at(step)
        assert at.entropy_coef == schedules.linear(0.1, 0.0, 10)(step)
        assert at.kl_cov_ratio == schedules.cosine(0.2, 0.0, 10)(step)
        assert at.ppo_kl_coef == 1.0 / (1 + step) and at.aent_coef == ctl.coef
        assert dataclasses.replace(at, **{name: config[name] for name in ck.losses.SCHEDULED}) == config
    ctl.coef = 2e-3  # a controller is read as it is now
    assert config.at(3).aent_coef == 2e-3
    with pytest.raises(ValueError, match="step"):
        config.at(-1)
    falling = LossConfig(entropy_coef=schedules.linear(0.1, -0.1, 10), clip_cov_ratio=schedules.linear(0.1, -0.1, 10))
    assert falling.at(5).clip_cov_ratio == 0.0
    with pytest.raises(ValueError, match="clip_cov_ratio"):  # a schedule is checked at every step it is read
        falling.at(6)


@pytest.mark.parametrize("name", ["entropy_coef", "kl_cov_ratio", "aent_coef"])
def test_a_loss_call_takes_numbers(name):
    config = LossConfig("kl_cov", clamp_fraction=0.3, **{name: schedules.constant(0.1)})
    with pytest.raises(ValueError, match=rf"{name} is a Constant.*config.at\(step\)"):
        ck.policy_loss(*make_batch(), config)
    ck.policy_loss(*make_batch(), config.at(0))


def call(fn, config, *, kw=None, seed=0, **more):
    """(loss, metrics, gradient) of ck.policy_loss or ck.token_loss with `config` and keywords `kw`."""
    logits, targets, old_logp, advantages, mask = make_batch()
    x = logits.clone().requires_grad_()
    g = torch.Generator().manual_seed(seed)
    if fn == "token_loss":
        logp, entropy = ck.logprobs_and_entropy(x, torch.where(mask, targets, -100))
        loss, metrics = ck.token_loss(logp, old_logp, advantages, mask, config, entropy=entropy, generator=g,
                                      **(kw or {}), **more)
    else:
        loss, metrics = ck.policy_loss(x, targets, old_logp, advantages, mask, config, generator=g, **(kw or {}),
                                       **more)
    (grad,) = torch.autograd.grad(loss, x)
    return loss, metrics, grad


def assert_identical(a, b):
    (la, ma, ga), (lb, mb, gb) = a, b
    assert torch.equal(la, lb) and torch.equal(ga, gb)
    assert ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) for k in ma)


@pytest.mark.parametrize("fn", ["policy_loss", "token_loss"])
@pytest.mark.parametrize("method", METHODS)
def test_a_config_gives_exactly_the_keyword_call(fn, method):
    kw = dict(method=method, centering="state", loss_agg_mode="seq-mean-token-mean", clip_ratio_low=0.1,
              clip_ratio_high=0.3, clip_ratio_c=2.0, ppo_kl_coef=0.5, temperature=0.7, validate=False,
              **{**SELECTIVE, "clip_cov_lb": -10.0, "clip_cov_ub": 10.0})
    if fn == "token_loss":
        del kw["temperature"]
    want = call(fn, None, kw=kw)
    assert_identical(call(fn, LossConfig(**kw)), want)
    # Fields by name replace the config's: a config and overrides equal the config with them replaced.
    assert_identical(call(fn, LossConfig(method=method, centering="batch", kl_cov_ratio=0.5), kw=kw), want)
    assert want[1]["n_selected"] > 0 or method == "ppo"


def test_aent_config_gives_exactly_the_keyword_call():
    kw = dict(method="clip_cov", aent_coef=0.2, clamp_fraction=0.25, **SELECTIVE)
    want = call("policy_loss", None, kw=kw)
    assert_identical(call("policy_loss", LossConfig(**kw)), want)
    assert "clamped_entropy" in want[1]
    with pytest.raises(ValueError, match="aent_coef.*policy_loss"):
        call("token_loss", LossConfig(**kw))


def test_method_aliases_take_a_config():
    config = LossConfig("ppo", kl_cov_ratio=0.2)
    batch = make_batch()
    got, _ = ck.kl_cov_loss(*batch, config)
    want, _ = ck.policy_loss(*batch, method="kl_cov", kl_cov_ratio=0.2)
    assert torch.equal(got, want)


def test_policy_loss_module_from_a_config_equals_keywords():
    kw = dict(kl_cov_ratio=0.2, ppo_kl_coef=schedules.linear(1.0, 0.0, steps=10), entropy_coef=0.01,
              temperature=0.9)
    from_keywords = ck.PolicyLoss("kl_cov", **kw)
    from_config = ck.PolicyLoss(LossConfig("kl_cov", **kw))
    assert from_config.config == from_keywords.config == LossConfig("kl_cov", **kw)
    assert ck.PolicyLoss(LossConfig("kl_cov", **kw), ppo_kl_coef=0.3).config.ppo_kl_coef == 0.3
    assert repr(from_config) == repr(from_keywords) and "kl_cov" in repr(from_config)
    batch = make_batch()
    for step in (0, 4, 12):
        got, got_metrics = from_config(*batch, step=step)
        want, want_metrics = ck.policy_loss(*batch, from_keywords.config.at(step))
        assert torch.equal(got, want) and torch.equal(got_metrics["ppo_kl"], want_metrics["ppo_kl"])
        assert from_config.coefficients(step)["ppo_kl_coef"] == schedules.linear(1.0, 0.0, steps=10)(step)


@pytest.mark.parametrize("method", ["clip_cov", "kl_cov"])
def test_selection_from_a_config_equals_keywords(method):
    logits, targets, old_logp, advantages, mask = make_batch()
    logp, entropy = ck.logprobs_and_entropy(logits, torch.where(mask, targets, -100))
    kw = dict(method=method, centering="state", **SELECTIVE)
    want = CovSelection.build(logp, old_logp, advantages, mask, entropy=entropy,
                              generator=torch.Generator().manual_seed(1), **kw)
    got = CovSelection.build(logp, old_logp, advantages, mask, LossConfig(**kw), entropy=entropy,
                             generator=torch.Generator().manual_seed(1))
    assert got.method == method and torch.equal(got.selected, want.selected) and torch.equal(got.scores, want.scores)
    assert got.selected.any()
    with pytest.raises(ValueError, match="clip_cov_ratio"):
        CovSelection.build(logp, old_logp, advantages, mask, LossConfig(**kw), entropy=entropy, clip_cov_ratio=-1.0)


def test_config_is_frozen_picklable_and_replaceable():
    config = LossConfig("clip_cov", entropy_coef=schedules.cosine(1e-2, 0.0, 100), aent_coef=ck.AEntController())
    assert pickle.loads(pickle.dumps(LossConfig("kl_cov", kl_cov_ratio=0.1))) == LossConfig("kl_cov", kl_cov_ratio=0.1)
    clone = pickle.loads(pickle.dumps(config))
    assert clone.entropy_coef == config.entropy_coef and clone.aent_coef.coef == config.aent_coef.coef
    assert copy.deepcopy(config).at(50) == config.at(50)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.method = "ppo"
    assert dataclasses.replace(config, method="kl_cov").method == "kl_cov"
    with pytest.raises(ValueError, match="centering"):
        dataclasses.replace(config, centering="tokens")  # checked again
    assert hash(LossConfig("kl_cov")) == hash(LossConfig("kl_cov"))
    assert [config[name] for name in FIELDS] == [getattr(config, name) for name in FIELDS]
    with pytest.raises(KeyError):
        config["beta"]


def test_config_compiles_whole():
    logits, *rest = make_batch()
    config = LossConfig("kl_cov", kl_cov_ratio=0.2, validate=False)

    def step(x):
        loss, metrics = ck.policy_loss(x, *rest, config, entropy_coef=0.01)
        return loss, metrics["n_selected"]

    torch._dynamo.reset()
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(logits)
    want = step(logits)
    assert torch.allclose(got[0], want[0], atol=1e-6) and got[1] == want[1] > 0
