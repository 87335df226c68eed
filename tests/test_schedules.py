"""Tests of covkernels.schedules: values at chosen steps, the end plateau, and argument checks."""
import dataclasses
import doctest
import itertools
import math

import pytest

from covkernels import schedules as S


def test_constant():
    c = S.constant(3)
    assert c(0) == 3.0 and c(10**9) == 3.0 and isinstance(c(0), float)


def test_linear():
    f = S.linear(1.0, 0.0, 4)
    assert [f(s) for s in range(6)] == [1.0, 0.75, 0.5, 0.25, 0.0, 0.0]
    assert S.linear(0.0, 2.0, 3)(10) == 2.0  # stays at end, also when rising


def test_cosine():
    f = S.cosine(1.0, 0.2, 100)
    assert f(0) == 1.0 and f(50) == pytest.approx(0.6, abs=1e-15) and f(100) == 0.2 and f(1000) == 0.2
    assert f(25) == pytest.approx(0.2 + 0.8 * (1 + math.cos(math.pi / 4)) / 2, abs=1e-15)
    values = [f(s) for s in range(101)]
    assert all(a >= b for a, b in itertools.pairwise(values))


def test_exponential():
    f = S.exponential(2.0, 0.5)
    assert [f(s) for s in range(4)] == [2.0, 1.0, 0.5, 0.25]
    assert S.exponential(3.0, 1.0)(1000) == 3.0


def test_resolve_reads_numbers_and_schedules():
    assert S.resolve(0.1, 7) == 0.1 and S.resolve(2, 0) == 2.0
    assert S.resolve(S.linear(1.0, 0.0, 10), 5) == 0.5
    assert S.resolve(lambda step: step * 2, 3) == 6.0


def test_schedules_are_frozen_and_hashable():
    f = S.cosine(1.0, 0.0, 10)
    with pytest.raises(dataclasses.FrozenInstanceError):
        f.start = 2.0
    assert f == S.cosine(1, 0, 10) and hash(f) == hash(S.cosine(1, 0, 10))


@pytest.mark.parametrize("make, name", [
    (lambda: S.linear(1.0, 0.0, 0), "steps"),
    (lambda: S.cosine(1.0, 0.0, -5), "steps"),
    (lambda: S.linear(1.0, 0.0, 2.5), "steps"),
    (lambda: S.exponential(1.0, 0.0), "rate"),
    (lambda: S.exponential(1.0, 1.5), "rate"),
    (lambda: S.constant(float("nan")), "value"),
    (lambda: S.linear(float("inf"), 0.0, 3), "start"),
    (lambda: S.constant(1.0)(-1), "step"),
    (lambda: S.linear(1.0, 0.0, 3)(1.5), "step"),
], ids=["steps0", "steps_neg", "steps_float", "rate0", "rate_gt1", "value_nan", "start_inf", "step_neg",
        "step_float"])
def test_bad_arguments_name_the_argument(make, name):
    with pytest.raises(ValueError, match=rf"^{name} "):
        make()


def test_docstring_example():
    assert doctest.testmod(S).failed == 0
