"""covkernels.theory, and the theory examples at CI size (examples/entropy_dynamics.py, bias.py, entropy_law.py).

The examples run as subprocesses without TRITON_INTERPRET (conftest sets it for the kernel tests), so
covkernels takes its PyTorch path there; the three together take about a minute (bias.py in two processes).
"""
import importlib.util
import itertools
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from covkernels.theory import EntropyLaw, entropy_regularized_policy, fit_entropy_law

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None


def run_example(script, out_dir, *args):
    """Runs examples/<script> --small --out out_dir; returns its JSON output."""
    pytest.importorskip("matplotlib")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, os.path.join(ROOT, "examples", script), "--small", "--out", str(out_dir), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    png = out_dir / script.replace(".py", ".png")
    assert png.exists() and png.stat().st_size < 200_000
    with open(out_dir / script.replace(".py", ".json")) as f:
        return json.load(f)


# --- fit_entropy_law ---------------------------------------------------------------------------------------

def _law_data(n=200, a=0.3, b=0.9, sigma=0.01, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = 0.2 + 2.3 * torch.rand(n, generator=g, dtype=torch.float64)
    return h, -a * h.exp() + b + sigma * torch.randn(n, generator=g, dtype=torch.float64)


def test_fit_recovers_known_law():
    h, r = _law_data()
    law = fit_entropy_law(h, r)
    assert isinstance(law, EntropyLaw) and law.n == 200
    assert abs(law.a - 0.3) < 4 * law.a_se and abs(law.b - 0.9) < 4 * law.b_se
    assert 0 < law.a_se < 0.01 and 0 < law.b_se < 0.01
    assert law.r2 > 0.99
    assert law.ceiling == pytest.approx(law.b - law.a)
    assert law.predict(0.0) == pytest.approx(law.ceiling)
    assert torch.allclose(law.predict(h), -law.a * h.exp() + law.b)


def test_fit_standard_errors_match_the_spread_of_estimates():
    # Same design, fresh noise: the reported standard errors are the spread of the estimates.
    g = torch.Generator().manual_seed(0)
    h = _law_data(n=40, seed=0)[0]
    fits = []
    for _ in range(400):
        r = -0.3 * h.exp() + 0.9 + 0.05 * torch.randn(40, generator=g, dtype=torch.float64)
        fits.append(fit_entropy_law(h, r))
    a = torch.tensor([f.a for f in fits], dtype=torch.float64)
    b = torch.tensor([f.b for f in fits], dtype=torch.float64)
    ceiling = torch.tensor([f.ceiling for f in fits], dtype=torch.float64)
    for est, se in ((a, [f.a_se for f in fits]), (b, [f.b_se for f in fits]), (ceiling, [f.ceiling_se for f in fits])):
        assert est.std().item() == pytest.approx(sum(se) / len(se), rel=0.15)
    covered = sum(abs(f.a - 0.3) < 1.96 * f.a_se for f in fits) / len(fits)
    assert 0.9 < covered < 0.99


def test_fit_without_noise_is_exact():
    h = torch.linspace(0.1, 3.0, 10, dtype=torch.float64)
    law = fit_entropy_law(h.tolist(), (-0.5 * h.exp() + 2.0).tolist())
    assert law.a == pytest.approx(0.5, abs=1e-12) and law.b == pytest.approx(2.0, abs=1e-12)
    assert law.a_se < 1e-10 and law.r2 == pytest.approx(1.0)


def test_fit_constant_reward_has_nan_r2():
    law = fit_entropy_law([0.5, 1.0, 1.5], [0.3, 0.3, 0.3])
    assert law.a == pytest.approx(0.0) and law.b == pytest.approx(0.3) and math.isnan(law.r2)


@pytest.mark.parametrize("entropy, reward, error", [
    ([1.0, 2.0, 3.0], [0.1, 0.2], ValueError),
    ([1.0, 2.0], [0.1, 0.2], ValueError),
    ([1.0, float("nan"), 3.0], [0.1, 0.2, 0.3], ValueError),
    ([1.0, 2.0, 3.0], [0.1, float("inf"), 0.3], ValueError),
    ([[1.0, 2.0, 3.0]], [[0.1, 0.2, 0.3]], ValueError),
    ([-0.5, 1.0, 2.0], [0.1, 0.2, 0.3], ValueError),
    ([1.0, 1.0, 1.0], [0.1, 0.2, 0.3], ValueError),
    ([1.0, 2.0, 800.0], [0.1, 0.2, 0.3], ValueError),
    ("abc", [0.1, 0.2, 0.3], TypeError),
    ([1.0, 2.0, 3.0], [None, 0.2, 0.3], TypeError),
], ids=["length", "too-few", "nan-entropy", "inf-reward", "2d", "negative-entropy", "constant-entropy",
        "overflow", "string", "none"])
def test_fit_rejects_bad_input(entropy, reward, error):
    with pytest.raises(error):
        fit_entropy_law(entropy, reward)


def test_entropy_regularized_policy_maximises_the_regularised_reward():
    r = torch.tensor([0.8, 0.7, 0.1, 0.0], dtype=torch.float64)
    alpha = 0.1
    q = entropy_regularized_policy(r, alpha)
    assert torch.allclose(q, torch.softmax(r / alpha, -1)) and q.dtype == torch.float64

    def objective(p):
        return (p * r).sum() - alpha * (p * p.log()).sum()

    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        other = torch.softmax((r / alpha).log_softmax(-1) + 0.3 * torch.randn(4, generator=g, dtype=torch.float64), -1)
        assert objective(other) < objective(q)
    for bad in (0.0, -1.0, float("inf"), True):
        with pytest.raises(ValueError):
            entropy_regularized_policy(r, bad)


# --- the examples -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dynamics(tmp_path_factory):
    args = () if HAS_TRANSFORMERS else ("--no-lm",)
    return run_example("entropy_dynamics.py", tmp_path_factory.mktemp("dynamics"), *args)


@pytest.fixture(scope="module")
def bias_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bias")
    result = run_example("bias.py", out, "--jobs", "2")
    assert (out / "bias_sweep.png").exists() and (out / "bias_sweep.png").stat().st_size < 200_000
    return result, out


@pytest.mark.parametrize("kind", ["pg", "npg"])
def test_tabular_prediction_error_shrinks_like_step_squared(dynamics, kind):
    rows = [r for r in dynamics["tabular"] if r["kind"] == kind]
    assert len(rows) == 3 and [r["max_move"] for r in rows] == [0.4, 0.2, 0.1]
    for r in rows[1:]:
        assert 3.5 < r["err_ratio"] < 4.5, r  # halving the step quarters the error
    assert rows[-1]["rel_err"] < 0.05 and rows[-1]["corr"] > 0.999


@pytest.mark.skipif(not HAS_TRANSFORMERS, reason="the tiny LM needs transformers")
def test_tiny_lm_lemma1_with_the_actual_logit_change(dynamics):
    rows = {(r["lr"], r["states"], r["predictor"]): r for r in dynamics["lm"]}
    lrs = sorted({lr for lr, _, _ in rows}, reverse=True)
    for states in ("trained", "held-out"):
        lemma = [rows[lr, states, "lemma1"] for lr in lrs]
        # First order in the logits: right size (scale ~1), and the error halves with the step.
        assert all(r["corr"] > 0.99 and 0.95 < r["scale"] < 1.05 for r in lemma), lemma
        for big, small in itertools.pairwise(lemma):
            assert 1.6 < big["rel_err"] / small["rel_err"] < 2.4, (states, big, small)
        assert lemma[-1]["rel_err"] < 0.05


@pytest.mark.skipif(not HAS_TRANSFORMERS, reason="the tiny LM needs transformers")
def test_tiny_lm_heuristics_miss_the_size(dynamics):
    """Without dz the token-local formulas and the batch score follow the sign, not the size."""
    rows = {(r["lr"], r["states"], r["predictor"]): r for r in dynamics["lm"]}
    lr = min(lr for lr, _, _ in rows)
    pg = rows[lr, "trained", "pg"]
    assert pg["corr"] > 0.5 and pg["rel_err"] > 0.5 and pg["scale"] > 10
    for k in ("npg", "eq10"):
        assert rows[lr, "trained", k]["rel_err_scaled"] > 0.5 and rows[lr, "trained", k]["scale"] > 5


def test_bias_constant_bonus_reaches_the_closed_form(bias_run):
    rows = bias_run[0]["exact"]["rows"]
    closed = rows["closed form softmax(r / alpha)"]
    assert rows["entropy bonus"]["tv_closed_form"] < 0.03
    assert rows["entropy bonus"]["p_best"] == pytest.approx(closed["p_best"], abs=0.02)
    assert closed["p_best"] < 0.95  # the closed form itself is biased away from the argmax


def test_bias_annealing_to_zero_removes_the_bias(bias_run):
    rows = bias_run[0]["exact"]["rows"]
    for name in ("entropy bonus, annealed", "Clip-Cov, annealed"):
        assert rows[name]["p_best"] > 0.99, name
    assert rows["Clip-Cov, annealed"]["p_best"] > rows["Clip-Cov"]["p_best"]
    # On-policy, KL-Cov's |l - l_old| has no gradient: its expected gradient is the plain policy gradient.
    for k in ("p_best", "entropy"):
        assert rows["KL-Cov"][k] == pytest.approx(rows["no control"][k], abs=1e-6)


def test_bias_table(bias_run):
    (result,) = bias_run[0]["results"]
    rows = result["rows"]
    assert set(rows) >= {"no control", "entropy bonus", "entropy bonus, annealed", "Clip-Cov", "Clip-Cov, annealed",
                         "KL-Cov", "KL-Cov, annealed", "AEnt"}
    for row in rows.values():
        assert 0 <= row["p_best"] <= 1 and row["regret"] >= 0
    # A constant bonus keeps entropy up; annealed to 0 it lets the policy concentrate like no control.
    assert rows["entropy bonus"]["entropy"] > 3 * rows["entropy bonus, annealed"]["entropy"]
    assert rows["Clip-Cov"]["entropy"] > 3 * rows["no control"]["entropy"]


def test_bias_sweep(bias_run):
    """More bonus, more entropy and a lower P(best); the closed form spans the same range."""
    sweep = bias_run[0]["sweep"]
    bonus = sorted(sweep["entropy bonus"], key=lambda p: p["strength"])
    assert len(bonus) >= 2 and len(sweep["Clip-Cov"]) >= 2
    for weak, strong in itertools.pairwise(bonus):
        assert strong["entropy"] > weak["entropy"] and strong["p_best"] < weak["p_best"]
    closed = sweep["closed form softmax(r / alpha)"]
    assert min(p["p_best"] for p in closed) < bonus[-1]["p_best"] < max(p["p_best"] for p in closed)


def test_entropy_law_on_logged_curves(bias_run, tmp_path):
    _, bias_out = bias_run
    rows = run_example("entropy_law.py", tmp_path, "--log", str(bias_out / "bias.json"))
    assert {r["method"] for r in rows} == {"no control", "entropy bonus, annealed", "KL-Cov"}
    for row in rows:
        assert row["full"]["a"] > 0 and row["full"]["a_se"] > 0 and 0 <= row["full"]["r2"] <= 1


def test_entropy_law_trains_its_own_curve(tmp_path):
    (row,) = run_example("entropy_law.py", tmp_path, "--methods", "no control")
    assert row["method"] == "no control" and row["full"]["n"] == 151
