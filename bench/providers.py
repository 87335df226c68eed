"""Who computes the log-prob and entropy of a case: covkernels, the reference, and the peers.

Each provider is a function f(logits [B, T, V], targets [B, T]) -> (logp, entropy) of targets' shape, with
0 on padded rows (the contract of covkernels), or (logp, None) for a peer that has no entropy. A peer is
wrapped the way a trainer would call it: padded targets replaced by 0 before its gather, its outputs
masked after. Peers are found by importing their documented entry points; one that is not installed, or
whose entry point is missing, is reported by name with the reason, never dropped silently.
"""
import dataclasses
import importlib
import importlib.util
import inspect

import torch

from .cases import IGNORE_INDEX


class Unavailable(Exception):
    """The provider cannot run here; the message says why (shown in the table and as the skip reason)."""


@dataclasses.dataclass(frozen=True)
class Provider:
    name: str
    kind: str  # "ours", "reference" or "peer"
    load: object  # () -> fn; raises Unavailable
    computes: tuple = ("logp", "entropy")
    ops: tuple = ("fwd", "fwd_bwd")
    mutates: bool = False  # overwrites the logits in fwd_bwd (in-place gradient)
    note: str = ""


def _module(name, attr=None, pip=None):
    """Imports `name` (and returns its `attr`), or raises Unavailable naming what is missing."""
    top = name.split(".")[0]
    if importlib.util.find_spec(top) is None:
        raise Unavailable(f"{top} not installed" + (f" (pip install {pip})" if pip else ""))
    try:
        mod = importlib.import_module(name)
    except Exception as e:  # a broken install must not stop the other providers
        raise Unavailable(f"import {name} failed: {type(e).__name__}: {e}") from e
    if attr is None:
        return mod
    if not hasattr(mod, attr):
        raise Unavailable(f"{name}.{attr} not found (this version has no such entry point)")
    return getattr(mod, attr)


def _valid_and_safe(targets):
    valid = targets != IGNORE_INDEX
    return valid, torch.where(valid, targets, torch.zeros_like(targets))


def _masked(valid, *xs):
    return tuple(None if x is None else torch.where(valid, x.float(), 0.0) for x in xs)


def _covkernels(inplace):
    def load():
        import covkernels as ck

        def fn(logits, targets):
            # validate=False: the sync-free hot path (validation is one host sync on the targets).
            return ck.logprobs_and_entropy(logits, targets, ignore_index=IGNORE_INDEX, validate=False,
                                           inplace_backward=inplace)
        return fn
    return load


def _covkernels_aent():
    import covkernels as ck

    def fn(logits, targets):
        # The AEnt path: the radix-select threshold passes, then the plain and clamped statistics in one
        # read (and the clamped backward). Its time beside "covkernels" is the cost of the clamped entropy.
        s = ck.token_stats(logits, targets, ignore_index=IGNORE_INDEX, clamp_fraction=0.3, validate=False)
        return s.logp, s.entropy
    return fn


def _python_ref():
    import python_ref as ref

    return lambda logits, targets: ref.logprobs_and_entropy(logits, targets, ignore_index=IGNORE_INDEX)


def raise_recompile_limit(n=64):
    """dynamic=False compiles once per shape (and once more with grad); the default limit of 8 would send
    a long run's later shapes back to eager without a word."""
    import torch._dynamo.config as dynamo_config

    for name in ("recompile_limit", "cache_size_limit"):  # renamed in torch 2.7
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), n))


def _compiled_ref():
    import python_ref as ref

    raise_recompile_limit()
    compiled = torch.compile(ref.logprobs_and_entropy, dynamic=False)
    return lambda logits, targets: compiled(logits, targets, ignore_index=IGNORE_INDEX)


def _trl():
    slsm = _module("trl.trainer.utils", "selective_log_softmax", pip="trl")
    entropy = _module("trl.trainer.utils", "entropy_from_logits")
    has_mask = "row_mask" in inspect.signature(slsm).parameters

    def fn(logits, targets):
        valid, safe = _valid_and_safe(targets)
        # Newer TRL skips masked rows itself; entropy_from_logits has no mask, so it reads every row.
        logp = slsm(logits, safe, row_mask=valid) if has_mask else slsm(logits, safe)
        return _masked(valid, logp, entropy(logits))
    return fn


def _trl_fused():
    fused = _module("trl.kernels", "selective_log_softmax_and_entropy", pip="trl")

    def fn(logits, targets):
        valid, safe = _valid_and_safe(targets)
        logp, ent = fused(logits, safe, row_mask=valid)
        return _masked(valid, logp, ent)
    return fn


def _verl():
    # logprobs_from_logits_v2 is the PyTorch path that verl's logprobs_from_logits takes without flash-attn;
    # it is called directly so that an installed flash-attn does not change what this provider measures.
    v2 = _module("verl.utils.torch_functional", "logprobs_from_logits_v2", pip="verl")
    entropy = _module("verl.utils.torch_functional", "entropy_from_logits")

    def fn(logits, targets):
        valid, safe = _valid_and_safe(targets)
        return _masked(valid, v2(logits, safe), entropy(logits))
    return fn


def _verl_flash():
    if importlib.util.find_spec("flash_attn") is None:
        raise Unavailable("flash-attn not installed (verl's fused log-prob path needs it)")
    tf = _module("verl.utils.torch_functional", pip="verl")
    # verl spells the flag "FLAH_ATTN_..." (sic); accept the corrected spelling too.
    if not any(getattr(tf, f, False) for f in ("FLAH_ATTN_CROSS_ENTROPY_LOSS_AVAILABLE",
                                                "FLASH_ATTN_CROSS_ENTROPY_LOSS_AVAILABLE")):
        raise Unavailable("verl did not load flash-attn's cross-entropy")

    def fn(logits, targets):
        valid, safe = _valid_and_safe(targets)
        return _masked(valid, tf.logprobs_from_logits(logits, safe, inplace_backward=True),
                       tf.entropy_from_logits(logits))
    return fn


def _liger():
    ce = _module("liger_kernel.transformers.functional", "liger_cross_entropy", pip="liger-kernel")

    def fn(logits, targets):
        V = logits.shape[-1]
        # Cross-entropy with reduction="none" is -logp per row, 0 at ignore_index. Liger writes the
        # gradient into the logits during the forward when they require grad (hence mutates=True).
        loss = ce(logits.reshape(-1, V), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none")
        return -loss.view(targets.shape).float(), None
    return fn


PROVIDERS = [
    Provider("covkernels", "ours", _covkernels(False)),
    Provider("covkernels_inplace", "ours", _covkernels(True), ops=("fwd_bwd",), mutates=True,
             note="inplace_backward=True"),
    Provider("covkernels_aent", "ours", _covkernels_aent,
             note="token_stats(clamp_fraction=0.3): + AEnt clamped entropy, same logp/entropy"),
    Provider("python_ref", "reference", _python_ref, note="eager, input dtype"),
    Provider("compiled_ref", "reference", _compiled_ref, note="torch.compile(python_ref)"),
    Provider("trl", "peer", _trl, note="selective_log_softmax + entropy_from_logits"),
    Provider("trl_fused", "peer", _trl_fused, note="trl.kernels.selective_log_softmax_and_entropy"),
    Provider("verl", "peer", _verl, note="logprobs_from_logits_v2 + entropy_from_logits (torch)"),
    Provider("verl_flash", "peer", _verl_flash, note="logprobs_from_logits (flash-attn CE) + entropy"),
    Provider("liger", "peer", _liger, computes=("logp",), mutates=True,
             note="liger_cross_entropy(reduction='none'): logp only"),
]
BY_NAME = {p.name: p for p in PROVIDERS}


def select(names=None):
    """Providers by name (all when names is None); an unknown name is an error, not a silent no-op."""
    if names is None:
        return list(PROVIDERS)
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        raise ValueError(f"unknown providers {unknown}; known: {list(BY_NAME)}")
    return [BY_NAME[n] for n in names]


def fwd_bwd(fn, logits, targets, g_logp, g_ent):
    """Forward, then the gradient of sum(g_logp * logp + g_ent * entropy) with respect to the logits."""
    logp, ent = fn(logits, targets)
    outs, grads = (logp,), (g_logp,)
    if ent is not None:
        outs, grads = (logp, ent), (g_logp, g_ent)
    (grad,) = torch.autograd.grad(outs, logits, grads)
    return logp, ent, grad
