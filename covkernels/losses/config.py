"""LossConfig: the settings of a policy loss, written and checked in one place (docs/losses.md)."""
import math
import numbers
from collections.abc import Callable
from dataclasses import KW_ONLY, dataclass, fields, replace

from .. import schedules
from .._validation import (check_choice, check_fraction, check_nonnegative, check_positive,
                           check_temperature_range)
from ..aent import AEntController
from ..selection import CENTERINGS

METHODS = ("ppo", "clip_cov", "kl_cov")
AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
# The fields that may be a schedule (covkernels.schedules, or any callable step -> float), read by
# LossConfig.at(step); aent_coef may also be an AEntController, read as its current coefficient.
SCHEDULED = ("entropy_coef", "ppo_kl_coef", "clip_cov_ratio", "kl_cov_ratio", "aent_coef")

Schedule = Callable[[int], float]


@dataclass(frozen=True)
class LossConfig:
    """The settings of a policy loss, checked once when made: `policy_loss`, `token_loss`, `PolicyLoss`,
    `CovSelection.build` and the trainer integrations all take one.

    What belongs here: whatever stays fixed over a run and is plain data (numbers, strings, schedules),
    that is the loss's hyperparameters and the options of the pass that reads the policy from the logits
    (temperature, ignore_index, validate), all that PolicyLoss holds. What changes from call to call, or is
    not plain data, is an argument of the call: the tensors, the generator (its state moves on), the global
    denominators num_tokens / num_seqs (they change every step), process_group (a live handle) and a
    precomputed selection. A loss call takes numbers; `config.at(step)` reads the schedules.

    method: "ppo", "clip_cov" or "kl_cov" (their per-token losses: `token_loss`); every other field by name.
    clip_ratio, clip_ratio_low, clip_ratio_high: the PPO clip range [1 - low, 1 + high], each None
        (default) taking clip_ratio (which may be None when both are given).
    clip_ratio_c: verl's dual clip, > 1 (None: off).
    clip_cov_ratio, clip_cov_lb, clip_cov_ub: Clip-Cov's fraction of the valid tokens (2e-4 = 0.02 %, a
        fraction, not percent) and its window lb < C < ub.
    kl_cov_ratio, ppo_kl_coef: KL-Cov's fraction of the valid tokens and coefficient beta.
    centering: "batch" (verl, C = (logp - mean)(A - mean)) or "state" (Baehr & Lei, C = (logp + H) A).
    entropy_coef: alpha of the entropy bonus - alpha * agg(H); a Python number (a tensor would
        synchronise with the host), as is every coefficient.
    loss_agg_mode: "token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean" or
        "seq-mean-token-sum-norm" (verl's agg_loss).
    aent_coef, clamp_fraction: AEnt's lambda and p (needs the logits: policy_loss only); clamp_fraction
        must be given when aent_coef is not 0, and defaults to an AEntController's own.
    temperature, ignore_index, validate: those of the fused pass under policy_loss (`logprobs_and_entropy`);
        validate also checks the per-token inputs (one host sync). token_loss and CovSelection.build take
        log-probs already computed and use only validate.
    entropy_coef, ppo_kl_coef, clip_cov_ratio, kl_cov_ratio and aent_coef (SCHEDULED) may be schedules
    (checked here at step 0, at `at(step)` at that step); aent_coef may also be an AEntController.

    Example:
        >>> config = LossConfig("kl_cov", kl_cov_ratio=2e-3, entropy_coef=schedules.linear(1e-3, 0.0, 500))
        >>> loss, metrics = policy_loss(logits, targets, old_logp, adv, mask, config.at(step))
    """

    method: str = "ppo"
    _: KW_ONLY
    clip_ratio: float | None = 0.2
    clip_ratio_low: float | None = None
    clip_ratio_high: float | None = None
    clip_ratio_c: float | None = 3.0
    clip_cov_ratio: float | Schedule = 2e-4
    clip_cov_lb: float = 1.0
    clip_cov_ub: float = 5.0
    kl_cov_ratio: float | Schedule = 2e-4
    ppo_kl_coef: float | Schedule = 1.0
    centering: str = "batch"
    entropy_coef: float | Schedule = 0.0
    loss_agg_mode: str = "token-mean"
    aent_coef: float | Schedule | AEntController = 0.0
    clamp_fraction: float | None = None
    temperature: float = 1.0
    ignore_index: int = -100
    validate: bool = True

    def __post_init__(self):
        if self.clamp_fraction is None and isinstance(self.aent_coef, AEntController):
            object.__setattr__(self, "clamp_fraction", self.aent_coef.clamp_fraction)
        _check(self, {name: _read(getattr(self, name), 0) for name in SCHEDULED})

    def at(self, step):
        """This configuration at `step` (an int >= 0): every schedule read at it and an AEntController read
        as its current coefficient, so that every field is a number, as a loss call takes them."""
        schedules.check_step(step)
        return replace(self, **{name: _read(getattr(self, name), step) for name in SCHEDULED})

    def __getitem__(self, name):
        """config["name"] reads the field `name` (PolicyLoss.config, a dict before LossConfig, read that way)."""
        if name not in FIELD_NAMES:
            raise KeyError(name)
        return getattr(self, name)


FIELD_NAMES = frozenset(f.name for f in fields(LossConfig))


def active(value):
    """Whether a scheduled field is on: anything but the number 0 (a schedule may leave 0 later)."""
    return callable(value) or isinstance(value, AEntController) or value != 0


def with_overrides(config, overrides):
    """`config` (None: the defaults) with the fields named in `overrides` replaced, checked again."""
    unknown = [name for name in overrides if name not in FIELD_NAMES]
    if unknown:
        raise TypeError(f"unexpected keyword argument {unknown[0]!r}: neither an argument of the call nor a "
                        "LossConfig field")
    if config is None:
        return LossConfig(**overrides)
    if not isinstance(config, LossConfig):
        raise TypeError(f"config must be a LossConfig or None, got {type(config).__name__}")
    return replace(config, **overrides) if overrides else config


def call_config(config, overrides):
    """The LossConfig of one loss call: `with_overrides`, every scheduled field a number."""
    config = with_overrides(config, overrides)
    for name in SCHEDULED:
        value = getattr(config, name)
        if callable(value) or isinstance(value, AEntController):
            raise ValueError(f"{name} is a {type(value).__name__}, a loss call takes numbers: pass "
                             f"config.at(step) (PolicyLoss does, at the step given to forward)")
    return config


def _read(value, step):
    if isinstance(value, AEntController):
        return value.coef
    return schedules.resolve(value, step) if callable(value) else value


def _check_coefficient(name, value):
    # A Python number, not a tensor: a tensor coefficient would sync with the host at `!= 0`.
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise TypeError(f"{name} must be a finite real number (a float, not a tensor), got {value!r}")


def _check_real(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")


def _check(config, coefs):
    """Every check of a LossConfig; `coefs`: the SCHEDULED fields as numbers (at step 0)."""
    check_choice("method", config.method, METHODS)
    check_choice("centering", config.centering, CENTERINGS)
    check_choice("loss_agg_mode", config.loss_agg_mode, AGG_MODES)
    for name in ("clip_ratio", "clip_ratio_low", "clip_ratio_high"):
        if getattr(config, name) is not None:
            check_nonnegative(name, getattr(config, name))
    if config.clip_ratio is None and None in (config.clip_ratio_low, config.clip_ratio_high):
        raise ValueError("clip_ratio may be None only when clip_ratio_low and clip_ratio_high are both given")
    if config.clip_ratio_c is not None:
        _check_real("clip_ratio_c", config.clip_ratio_c)
        if not config.clip_ratio_c > 1:
            raise ValueError(f"clip_ratio_c must be > 1 (or None to turn the dual clip off), "
                             f"got {config.clip_ratio_c}")
    _check_real("clip_cov_lb", config.clip_cov_lb)
    _check_real("clip_cov_ub", config.clip_cov_ub)
    if not config.clip_cov_lb < config.clip_cov_ub:
        raise ValueError(f"clip_cov_lb must be < clip_cov_ub, got clip_cov_lb={config.clip_cov_lb}, "
                         f"clip_cov_ub={config.clip_cov_ub}")
    for name in ("clip_cov_ratio", "kl_cov_ratio", "aent_coef"):
        check_nonnegative(name, coefs[name])
    for name in ("entropy_coef", "ppo_kl_coef"):
        _check_coefficient(name, coefs[name])
    check_nonnegative("ppo_kl_coef", coefs["ppo_kl_coef"])
    if config.clamp_fraction is not None:
        check_fraction("clamp_fraction", config.clamp_fraction)
    elif active(config.aent_coef):
        raise ValueError(f"clamp_fraction must be given when aent_coef != 0 (AEnt's p), "
                         f"got aent_coef={config.aent_coef}")
    check_positive("temperature", config.temperature)
    check_temperature_range(config.temperature)
    if isinstance(config.ignore_index, bool) or not isinstance(config.ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {config.ignore_index!r}")
    if not isinstance(config.validate, bool):
        raise TypeError(f"validate must be a bool, got {config.validate!r}")
