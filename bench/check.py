"""Every provider's output is checked against python_ref in float64 before it is timed.

The reference runs on the checked rows only (a float64 copy of a 20 GB case would not fit), upcast from
the very inputs the provider saw. A provider passes when its error is at most 4 x the error of plain
PyTorch in the input dtype (python_ref run in that dtype on the same rows) plus a small tolerance: this
lets through a peer that returns bf16 log-probs, as plain PyTorch does, but not a wrong formula.
"""
import torch

import python_ref as ref

# Tolerance relative to 1 + max |reference|, on top of 4 x plain PyTorch's error in the input dtype.
TOL = {torch.bfloat16: 2**-6, torch.float16: 2**-9, torch.float32: 1e-4}


def max_err(a, b):
    """Largest |a - b| (inf where exactly one is NaN or they differ by an infinity)."""
    a, b = a.double(), b.double()
    same = (a == b) | (a.isnan() & b.isnan())
    diff = torch.where(same, 0.0, (a - b).abs()).nan_to_num(nan=float("inf"))
    return diff.max().item() if diff.numel() else 0.0


def _stats(x, t, g_logp, g_ent, with_grad):
    x = x.detach().clone().requires_grad_(with_grad)
    s = ref.token_stats(x, t)
    out = {"logp": s.logp.detach(), "entropy": s.entropy.detach()}
    if with_grad:
        # The two upstream sets a provider can be asked for: logp and entropy, or logp alone.
        out["grad"] = torch.autograd.grad(s.logp * g_logp + s.entropy * g_ent, x, torch.ones_like(g_logp),
                                          retain_graph=True)[0]
        out["grad_logp_only"] = torch.autograd.grad(s.logp * g_logp, x, torch.ones_like(g_logp))[0]
    return out


def reference(case, logits, targets, grads, rows):
    """{"truth": float64 outputs, "plain": python_ref in the input dtype} at `rows` (flat row indices)."""
    V = logits.shape[-1]
    x, t = logits.detach().reshape(-1, V)[rows], targets.reshape(-1)[rows]
    g_logp, g_ent = (g.reshape(-1)[rows] for g in grads)
    with_grad = case.op == "fwd_bwd"
    return {"truth": _stats(x.double(), t, g_logp.double(), g_ent.double(), with_grad),
            "plain": _stats(x, t, g_logp.to(x.dtype), g_ent.to(x.dtype), with_grad)}


def compare(case, provider, outputs, ref_out, rows):
    """Errors of a provider's (logp, entropy, grad) at `rows`; returns (errors dict, ok, worst)."""
    logp, ent, grad = outputs
    V = case.V
    got = {"logp": logp.reshape(-1)[rows]}
    if ent is not None:
        got["entropy"] = ent.reshape(-1)[rows]
    if grad is not None:
        got["grad"] = grad.reshape(-1, V)[rows]
    logp_only = "entropy" not in provider.computes
    return score(case, got, ref_out, lambda name: "grad_logp_only" if name == "grad" and logp_only else name)


def score(case, got, ref_out, key):
    """(errors by name, all within the rule, largest error) of the outputs `got` against ref_out's float64
    truth; key(name) names the reference entry. Rule: at most 4 x plain PyTorch's error + TOL * scale."""
    errors, ok = {}, True
    for name, value in got.items():
        truth, plain = ref_out["truth"][key(name)], ref_out["plain"][key(name)]
        err, err_plain = max_err(value, truth), max_err(plain, truth)
        scale = 1.0 + truth.abs().max().item() if truth.numel() else 1.0
        errors[name] = err
        ok &= err <= 4 * err_plain + TOL[case.torch_dtype] * scale
    return errors, ok, max(errors.values())
