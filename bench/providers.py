"""Who computes a case: a Provider names an implementation (covkernels, the reference, a peer) and how to
load it; each family (bench/registry.py) lists its own.

Peers are found by importing their documented entry points and wrapped the way a trainer would call them;
one that is not installed, or whose entry point is missing, is reported by name with the reason (the
message of Unavailable), never dropped silently. Loaders run once per process: the peers' imports take
seconds.
"""
import dataclasses
import importlib
import importlib.util

import torch

from .cases import IGNORE_INDEX


class Unavailable(Exception):
    """The provider cannot run here; the message says why (shown in the table and as the skip reason)."""


@dataclasses.dataclass(frozen=True)
class Provider:
    name: str
    kind: str  # "ours", "reference", "peer", or "baseline" (what the others are set against; runs first)
    load: object  # () -> fn, the provider's function in its family's convention; raises Unavailable
    computes: tuple = ("logp", "entropy")
    ops: tuple = None  # the ops of its family it runs; None: all of them
    mutates: bool = False  # overwrites its inputs in a backward (an in-place gradient)
    note: str = ""
    skip: object = None  # (case, device) -> why it does not run at that case, or None


_LOADED = {}


def load(provider, case, device, skip=None):
    """(fn, None), or (None, why it does not run): a skip reason given by the caller, Unavailable from its
    loader, or its own skip at this case. Loaded once per process."""
    if skip:
        return None, skip
    # Keyed by the loader, not the name: several families have a "python_ref".
    if provider.load not in _LOADED:
        try:
            _LOADED[provider.load] = (provider.load(), None)
        except Unavailable as e:
            _LOADED[provider.load] = (None, str(e))
    fn, reason = _LOADED[provider.load]
    if fn is not None and provider.skip:  # a provider that cannot run at this case says so
        reason = provider.skip(case, device)
    return (None, reason) if reason else (fn, None)


def entry_point(name, attr=None, pip=None):
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


def valid_and_safe(targets):
    """(valid rows, targets with 0 at ignore_index): what a peer's gather without ignore_index is given."""
    valid = targets != IGNORE_INDEX
    return valid, torch.where(valid, targets, torch.zeros_like(targets))


def masked(valid, *xs):
    """Outputs in fp32 with 0 on the padded rows, the contract of covkernels (None stays None)."""
    return tuple(None if x is None else torch.where(valid, x.float(), 0.0) for x in xs)


def compiled(fn):
    """torch.compile(fn, dynamic=False), compiled once per shape (and once more with grad): the recompile
    limit is raised first, since the default of 8 would send a long run's later shapes back to eager
    without a word."""
    import torch._dynamo.config as dynamo_config

    for name in ("recompile_limit", "cache_size_limit"):  # renamed in torch 2.7
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), 64))
    return torch.compile(fn, dynamic=False)
