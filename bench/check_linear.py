"""Every LM-head provider's output is checked against python_ref in float64 before it is timed.

As check.py does for the logits path: the reference runs upcast from the very inputs the provider saw, on
the checked rows (logp, entropy, d_hidden) and, for d_weight, which sums over every token, on the checked
vocabulary entries with the logits built chunk by chunk over all N rows (a float64 [N, V] would not fit).
A provider passes when its error is at most 4 x the error of plain PyTorch in the input dtype (bf16
logits from F.linear, then python_ref in bf16) plus check.TOL relative to 1 + max |reference|.
"""
import torch
import torch.nn.functional as F

from .check import _stats, score

CHUNK_ELEMENTS = 2**25  # float64 logits per chunk of the d_weight reference: 256 MB


def _grads(s, W):
    """d_hidden rows from d_logits rows, for both upstream sets (logp + entropy, logp alone)."""
    return {"d_hidden": s["grad"] @ W, "d_hidden_logp_only": s["grad_logp_only"] @ W}


def reference(case, hidden, weight, targets, grads, rows, cols):
    """{"truth": float64 outputs, "plain": PyTorch in the input dtype}: logits, logp and entropy at `rows`,
    with the backward d_hidden at `rows` and d_weight at `cols`, each also for logp alone."""
    D, dt = case.D, case.torch_dtype
    h, W, t = hidden.detach().reshape(-1, D), weight.detach(), targets.reshape(-1)
    g_logp, g_ent = (g.reshape(-1) for g in grads)
    W64 = W.double()
    with_grad = case.op == "linear_fwd_bwd"
    x64, x = h[rows].double() @ W64.T, F.linear(h[rows], W)
    truth = _stats(x64, t[rows], g_logp[rows].double(), g_ent[rows].double(), with_grad)
    plain = _stats(x, t[rows], g_logp[rows].to(dt), g_ent[rows].to(dt), with_grad)
    truth["logits"], plain["logits"] = x64, x
    if with_grad:
        truth.update(_grads(truth, W64))
        plain.update(_grads(plain, W))
        truth.update(_d_weight(h, W64, t, g_logp, g_ent, cols, torch.float64, torch.float64))
        # Plain PyTorch: bf16 d_logits, one matrix product accumulating in fp32, rounded to bf16 at the end.
        dw = _d_weight(h, W, t, g_logp.to(dt), g_ent.to(dt), cols, dt, torch.float32)
        plain.update({k: v.to(dt) for k, v in dw.items()})
    for out in (truth, plain):
        out.pop("grad", None)
        out.pop("grad_logp_only", None)
    return {"truth": truth, "plain": plain}


def _d_weight(h, W, t, g_logp, g_ent, cols, dtype, acc):
    """d_weight[cols] = sum over all rows of d_logits[:, cols].T @ hidden, the logits built in `dtype` chunk
    by chunk, the sum accumulated in `acc`; for both upstream sets."""
    N, D = h.shape
    out = {"d_weight": torch.zeros(len(cols), D, dtype=acc, device=h.device)}
    out["d_weight_logp_only"] = torch.zeros_like(out["d_weight"])
    step = max(1, CHUNK_ELEMENTS // W.shape[0])
    for i in range(0, N, step):
        hc = h[i:i + step].to(dtype)
        s = _stats(F.linear(hc, W.to(dtype)), t[i:i + step], g_logp[i:i + step], g_ent[i:i + step], True)
        out["d_weight"] += s["grad"][:, cols].to(acc).T @ hc.to(acc)
        out["d_weight_logp_only"] += s["grad_logp_only"][:, cols].to(acc).T @ hc.to(acc)
    return out


def compare(case, provider, outputs, ref_out, rows, cols):
    """Errors of a provider's outputs (a dict of full tensors) at the checked rows and vocabulary entries;
    returns (errors dict, ok, worst). Gradients are compared with the reference for the upstream set the
    provider can take (logp alone when it has no entropy)."""
    D = case.D
    got = {}
    for name in provider.computes:  # "logits" (the matmul baseline), "logp", "entropy"
        value = outputs[name]
        got[name] = value.reshape(-1, value.shape[-1])[rows] if name == "logits" else value.reshape(-1)[rows]
    if case.op == "linear_fwd_bwd" and "logp" in provider.computes:
        got["d_hidden"] = outputs["d_hidden"].reshape(-1, D)[rows]
        got["d_weight"] = outputs["d_weight"][cols]
    logp_only = "entropy" not in provider.computes
    return score(case, got, ref_out, lambda name: name + "_logp_only" if name.startswith("d_") and logp_only else name)
