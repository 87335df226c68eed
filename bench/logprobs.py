"""The logits family: log-prob and entropy of every row ("fwd") and their gradient ("fwd_bwd"), covkernels'
fused pass (plain, in-place backward, and the AEnt path) beside the reference and the peers.

Bytes per case (bench/cases.py's bytes_moved; Nv valid rows of N, e bytes per logit): fwd reads the valid
logits Nv V e + targets 8N and writes logp, entropy 8N; fwd_bwd adds a second read of the valid logits,
the per-row vectors 24N and a write of the whole gradient N V e (an in-place backward writes the same
bytes into the logits and allocates nothing).

Each provider is a function f(logits [B, T, V], targets [B, T]) -> (logp, entropy) of targets' shape, with
0 on padded rows (the contract of covkernels), or (logp, None) for a peer that has no entropy. A peer is
wrapped the way a trainer would call it: padded targets replaced by 0 before its gather, its outputs
masked after.
"""
import importlib.util
import inspect

from . import cases as C
from .cases import IGNORE_INDEX
from .family import Family
from .providers import Provider, Unavailable, compiled, entry_point, masked, valid_and_safe


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


def _compiled_ref():
    import python_ref as ref

    fn = compiled(ref.logprobs_and_entropy)
    return lambda logits, targets: fn(logits, targets, ignore_index=IGNORE_INDEX)


def _trl():
    slsm = entry_point("trl.trainer.utils", "selective_log_softmax", pip="trl")
    entropy = entry_point("trl.trainer.utils", "entropy_from_logits")
    has_mask = "row_mask" in inspect.signature(slsm).parameters

    def fn(logits, targets):
        valid, safe = valid_and_safe(targets)
        # Newer TRL skips masked rows itself; entropy_from_logits has no mask, so it reads every row.
        logp = slsm(logits, safe, row_mask=valid) if has_mask else slsm(logits, safe)
        return masked(valid, logp, entropy(logits))
    return fn


def _trl_fused():
    fused = entry_point("trl.kernels", "selective_log_softmax_and_entropy", pip="trl")

    def fn(logits, targets):
        valid, safe = valid_and_safe(targets)
        logp, ent = fused(logits, safe, row_mask=valid)
        return masked(valid, logp, ent)
    return fn


def _verl():
    # logprobs_from_logits_v2 is the PyTorch path that verl's logprobs_from_logits takes without flash-attn;
    # it is called directly so that an installed flash-attn does not change what this provider measures.
    v2 = entry_point("verl.utils.torch_functional", "logprobs_from_logits_v2", pip="verl")
    entropy = entry_point("verl.utils.torch_functional", "entropy_from_logits")

    def fn(logits, targets):
        valid, safe = valid_and_safe(targets)
        return masked(valid, v2(logits, safe), entropy(logits))
    return fn


def _verl_flash():
    if importlib.util.find_spec("flash_attn") is None:
        raise Unavailable("flash-attn not installed (verl's fused log-prob path needs it)")
    tf = entry_point("verl.utils.torch_functional", pip="verl")
    # verl spells the flag "FLAH_ATTN_..." (sic); accept the corrected spelling too.
    if not any(getattr(tf, f, False) for f in ("FLAH_ATTN_CROSS_ENTROPY_LOSS_AVAILABLE",
                                                "FLASH_ATTN_CROSS_ENTROPY_LOSS_AVAILABLE")):
        raise Unavailable("verl did not load flash-attn's cross-entropy")

    def fn(logits, targets):
        valid, safe = valid_and_safe(targets)
        return masked(valid, tf.logprobs_from_logits(logits, safe, inplace_backward=True),
                      tf.entropy_from_logits(logits))
    return fn


def _liger():
    ce = entry_point("liger_kernel.transformers.functional", "liger_cross_entropy", pip="liger-kernel")

    def fn(logits, targets):
        V = logits.shape[-1]
        # Cross-entropy with reduction="none" is -logp per row, 0 at ignore_index. Liger writes the
        # gradient into the logits during the forward when they require grad (hence mutates=True).
        loss = ce(logits.reshape(-1, V), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none")
        return -loss.view(targets.shape).float(), None
    return fn


PYTHON_REF = Provider("python_ref", "reference", _python_ref, note="eager, input dtype")
COMPILED_REF = Provider("compiled_ref", "reference", _compiled_ref, note="torch.compile(python_ref)")
TRL = Provider("trl", "peer", _trl, note="selective_log_softmax + entropy_from_logits")


class Logprobs(Family):
    name, title = "logits", "logits"
    ops = ("fwd", "fwd_bwd")
    printed = (("bytes", "bytes"), ("time", "time"))
    conventions = {
        "bytes": "from the algorithm, valid rows only, the same for every provider of a case: fwd reads the "
                 "valid logits + targets and writes logp, entropy; fwd_bwd adds a second read of the valid "
                 "logits + the per-row vectors and a write of the whole [N, V] gradient (in place: the same "
                 "bytes)"}
    providers = (
        Provider("covkernels", "ours", _covkernels(False)),
        Provider("covkernels_inplace", "ours", _covkernels(True), ops=("fwd_bwd",), mutates=True,
                 note="inplace_backward=True"),
        Provider("covkernels_aent", "ours", _covkernels_aent,
                 note="token_stats(clamp_fraction=0.3): + AEnt clamped entropy, same logp/entropy"),
        PYTHON_REF,
        COMPILED_REF,
        TRL,
        Provider("trl_fused", "peer", _trl_fused, note="trl.kernels.selective_log_softmax_and_entropy"),
        Provider("verl", "peer", _verl, note="logprobs_from_logits_v2 + entropy_from_logits (torch)"),
        Provider("verl_flash", "peer", _verl_flash, note="logprobs_from_logits (flash-attn CE) + entropy"),
        Provider("liger", "peer", _liger, computes=("logp",), mutates=True,
                 note="liger_cross_entropy(reduction='none'): logp only"),
    )

    def all_cases(self, mode):
        return [C.Case(op, *s) for op in self.ops for s in C.shapes(mode, heavy=op == "fwd_bwd")]


FAMILY = Logprobs()
