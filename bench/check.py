"""Every provider's output is checked against python_ref in float64 before it is timed.

A family's reference runs on the checked rows only (a float64 copy of a 20 GB case would not fit), upcast
from the very inputs the provider saw, and once more in the input dtype: plain PyTorch's error is what the
rule (bench/tolerances.py, kind "bench") sets a provider's error against.
"""
import math

import torch

import python_ref as ref

from .tolerances import error_and_bound


def token_stats(x, t, g_logp, g_ent, with_grad):
    """python_ref's log-prob and entropy of logits rows x [n, V] (in x's dtype) and, with_grad, the gradient
    of g_logp logp + g_ent entropy with respect to x, and of g_logp logp alone (the two upstream sets a
    provider can be asked for: logp and entropy, or logp alone)."""
    x = x.detach().clone().requires_grad_(with_grad)
    s = ref.token_stats(x, t)
    out = {"logp": s.logp.detach(), "entropy": s.entropy.detach()}
    if with_grad:
        out["grad"] = torch.autograd.grad(s.logp * g_logp + s.entropy * g_ent, x, torch.ones_like(g_logp),
                                          retain_graph=True)[0]
        out["grad_logp_only"] = torch.autograd.grad(s.logp * g_logp, x, torch.ones_like(g_logp))[0]
    return out


def logits_reference(x, t, grads, with_grad):
    """{"truth": float64, "plain": the input dtype} token_stats of logits rows x [n, V], targets t [n] and
    upstream gradients grads = (g_logp, g_ent) [n] (fp32)."""
    g_logp, g_ent = grads
    return {"truth": token_stats(x.double(), t, g_logp.double(), g_ent.double(), with_grad),
            "plain": token_stats(x, t, g_logp.to(x.dtype), g_ent.to(x.dtype), with_grad)}


def score(got, ref_out, dtype, logp_only=False):
    """(errors by name, all within the rule, largest error) of the outputs `got` against ref_out's "truth",
    plain PyTorch's error taken from ref_out's "plain". A provider without entropy (logp_only) is held to
    the gradients of the log-prob alone: the reference's "<name>_logp_only" where it has one."""
    errors, ok = {}, True
    for name, value in got.items():
        key = name + "_logp_only" if logp_only and name + "_logp_only" in ref_out["truth"] else name
        err, _, bound = error_and_bound(value, ref_out["truth"][key], ref_out["plain"][key], dtype, "bench")
        errors[name] = err
        ok &= err <= bound
    # NaN (an output NaN where the reference is not) counts as the largest error.
    worst = max(errors.values(), key=lambda e: math.inf if math.isnan(e) else e)
    return errors, ok, worst
