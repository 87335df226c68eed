"""Coefficient schedules (entropy bonus alpha, KL-Cov beta, ...): callables step -> float, pure Python.

The entropy bonus biases the stationary policy unless its coefficient is annealed to 0
(docs/losses.md#entropy-bonus), so every coefficient may be given either as a number or as one of these
schedules; `resolve` reads both.

    >>> alpha = cosine(1e-2, 0.0, steps=1000)
    >>> resolve(alpha, 500), resolve(3e-4, 500)
    (0.005, 0.0003)
"""
import math
import numbers
from dataclasses import dataclass


def check_step(step):
    """A step is an int >= 0; ValueError naming it otherwise."""
    if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
        raise ValueError(f"step must be an int >= 0, got {step!r}")


def _check_real(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite real number, got {value!r}")


def _check_steps(steps):
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps <= 0:
        raise ValueError(f"steps must be an int > 0, got {steps!r}")


@dataclass(frozen=True)
class Constant:
    """value at every step."""

    value: float

    def __call__(self, step):
        check_step(step)
        return self.value


@dataclass(frozen=True)
class Linear:
    """start + (end - start) * step / steps, then end from `steps` on."""

    start: float
    end: float
    steps: int

    def __call__(self, step):
        check_step(step)
        if step >= self.steps:
            return self.end
        return self.start + (self.end - self.start) * step / self.steps


@dataclass(frozen=True)
class Cosine:
    """end + (start - end) * (1 + cos(pi * step / steps)) / 2, then end from `steps` on."""

    start: float
    end: float
    steps: int

    def __call__(self, step):
        check_step(step)
        if step >= self.steps:
            return self.end
        return self.end + (self.start - self.end) * 0.5 * (1.0 + math.cos(math.pi * step / self.steps))


@dataclass(frozen=True)
class Exponential:
    """start * rate ** step."""

    start: float
    rate: float

    def __call__(self, step):
        check_step(step)
        return self.start * self.rate ** step


def constant(value):
    """The schedule that is `value` at every step."""
    _check_real("value", value)
    return Constant(float(value))


def linear(start, end, steps):
    """Linear from `start` at step 0 to `end` at step `steps` (> 0), `end` after."""
    _check_real("start", start)
    _check_real("end", end)
    _check_steps(steps)
    return Linear(float(start), float(end), int(steps))


def cosine(start, end, steps):
    """Half-cosine from `start` at step 0 to `end` at step `steps` (> 0), `end` after."""
    _check_real("start", start)
    _check_real("end", end)
    _check_steps(steps)
    return Cosine(float(start), float(end), int(steps))


def exponential(start, rate):
    """start * rate ** step, with 0 < rate <= 1 (decay, or constant at rate 1)."""
    _check_real("start", start)
    _check_real("rate", rate)
    if not 0 < rate <= 1:
        raise ValueError(f"rate must be in (0, 1], got {rate!r}")
    return Exponential(float(start), float(rate))


def resolve(coef, step):
    """The coefficient at `step`: float(coef) for a number, float(coef(step)) for a schedule or callable."""
    if callable(coef):
        return float(coef(step))
    return float(coef)
