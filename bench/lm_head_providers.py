"""Who computes an LM-head case (bench/lm_head.py): torch's matrix products (the throughput baseline), the
unfused path, covkernels' fused head, the reference, and the peers' fused linear cross-entropies.

Each provider but the baseline is a function f(hidden [B, T, D], weight [V, D], targets [B, T]) -> (logp,
entropy) of targets' shape, 0 on padded rows, or (logp, None) for a peer without entropy; the runner
differentiates it with respect to hidden and weight. The baseline, torch_matmul, is f(hidden, weight,
backward) -> {"logits" [B, T, V]} (+ "d_hidden", "d_weight" with backward): the matrix products alone. Peers are
called through their documented entry points, wrapped as a trainer would call them (padded targets
replaced by 0 for a kernel without ignore_index, outputs masked after); one that cannot run here says why.

Peer entry points as read (2026): Liger-Kernel 0.8.5 `liger_kernel.transformers.functional.
liger_fused_linear_cross_entropy` and `liger_kernel.ops.LigerFusedLinearScaledCrossEntropyFunction`;
apple/ml-cross-entropy at 3a79837 `cut_cross_entropy.linear_cross_entropy(e, c, targets, bias=None,
ignore_index=-100, softcap=None, reduction="mean", ...)`; verl 0.9.1 `verl.utils.kernel.linear_cross_entropy.
linear_cross_entropy(hidden, weight, labels, temperature: float, reduction: str)` -> (logprobs, entropy).
"""
import importlib
import os

import torch
import torch.nn.functional as F

from .cases import IGNORE_INDEX
from .providers import Provider, Unavailable, entry_point, masked, valid_and_safe


def _torch_matmul():
    def fn(hidden, weight, backward):
        with torch.no_grad():
            h = hidden.reshape(-1, hidden.shape[-1])
            z = torch.mm(h, weight.t())  # 2 N D V
            out = {"logits": z.view(*hidden.shape[:-1], -1)}
            if backward:
                # The two gradient products, the logits standing in for d_logits (same shape, dtype, layout;
                # not 0).
                out.update(d_hidden=torch.mm(z, weight), d_weight=torch.mm(z.t(), h))
            return out
    return fn


def _unfused(inplace):
    def load():
        import covkernels as ck

        def fn(hidden, weight, targets):
            logits = F.linear(hidden, weight)  # [B, T, V] in the input dtype, held until the backward is done
            return ck.logprobs_and_entropy(logits, targets, ignore_index=IGNORE_INDEX, validate=False,
                                           inplace_backward=inplace)
        return fn
    return load


def _covkernels_linear():
    fused = entry_point("covkernels", "linear_logprobs_and_entropy")

    def fn(hidden, weight, targets):
        # validate=False: the sync-free hot path, as for the logits providers.
        return fused(hidden, weight, targets, ignore_index=IGNORE_INDEX, validate=False)
    return fn


def _python_ref():
    import python_ref as ref

    return lambda hidden, weight, targets: ref.linear_logprobs_and_entropy(hidden, weight, targets,
                                                                          ignore_index=IGNORE_INDEX)


def _ref_fits(case, device):
    # F.linear's logits and python_ref's token_stats with its autograd graph: about ten [N, V] tensors.
    need = 10 * case.logits_bytes
    if device.type == "cuda" and need > torch.cuda.get_device_properties(device).total_memory // 2:
        return f"eager python_ref holds ~10 [N, V] tensors here (~{need / 1e9:.0f} GB); run at smaller N V"
    return None


def _liger():
    flce = entry_point("liger_kernel.transformers.functional", "liger_fused_linear_cross_entropy", pip="liger-kernel")

    def fn(hidden, weight, targets):
        valid = targets != IGNORE_INDEX
        # reduction="none": -logp per row, 0 at ignore_index. With per-token upstream gradients its backward
        # is right only in Liger-Kernel releases from July 2026 on; older ones come out "wrong" in the check.
        nll = flce(hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1), ignore_index=IGNORE_INDEX,
                   reduction="none")
        return masked(valid, -nll.view(targets.shape), None)
    return fn


def _liger_entropy():
    scaled = entry_point("liger_kernel.ops", "LigerFusedLinearScaledCrossEntropyFunction", pip="liger-kernel>=0.8")
    on_hopper = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)
    if on_hopper:
        try:  # its Hopper kernel is CuTe-DSL (nvidia-cutlass-dsl); elsewhere it runs a chunked PyTorch fallback
            importlib.import_module("liger_kernel.ops.cutedsl.ops.fused_scaled_cross_entropy_sm90")
        except Exception as e:  # any import failure means the peer cannot run here
            raise Unavailable(f"its Hopper kernel does not import: {type(e).__name__}: {e}") from e
        # Its target range check syncs with the host each call; off, like covkernels' validate=False.
        os.environ.setdefault("LIGER_SCALED_CE_SM90_VALIDATE_TARGETS", "0")

    def fn(hidden, weight, targets):
        valid = targets != IGNORE_INDEX
        nll, entropy = scaled.apply(hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1),
                                    temperature=1.0, ignore_index=IGNORE_INDEX, return_entropy=True)
        return masked(valid, -nll.view(targets.shape), entropy.view(targets.shape))
    fn.note = ("LigerFusedLinearScaledCrossEntropyFunction: " +
               ("CuTe-DSL Hopper kernel" if on_hopper else "chunked PyTorch fallback (no Hopper GPU)"))
    return fn


def _cce():
    if not torch.cuda.is_available():
        raise Unavailable("CUDA only (its default impl, 'cce', is Triton kernels on CUDA)")
    lce = entry_point("cut_cross_entropy", "linear_cross_entropy", pip="cut-cross-entropy")

    def fn(hidden, weight, targets):
        valid = targets != IGNORE_INDEX
        nll = lce(hidden, weight, targets, ignore_index=IGNORE_INDEX, reduction="none")  # targets' shape
        return masked(valid, -nll.view(targets.shape), None)
    return fn


def _verl_fused():
    if not torch.cuda.is_available():
        raise Unavailable("CUDA only (its kernels assert CUDA tensors)")
    lce = entry_point("verl.utils.kernel.linear_cross_entropy", "linear_cross_entropy", pip="verl")
    entry_point("verl.utils.kernel.kernels")  # its forward imports this lazily: fail here, not mid-run

    def fn(hidden, weight, targets):
        valid, safe = valid_and_safe(targets)  # no ignore_index: padded rows get target 0, masked after
        logp, entropy = lce(hidden.reshape(-1, hidden.shape[-1]), weight, safe.reshape(-1), 1.0, "none")
        return masked(valid, logp.view(targets.shape), entropy.view(targets.shape))
    return fn


def _bf16_on_hopper(case, device):
    hopper = device.type == "cuda" and torch.cuda.get_device_capability(device) == (9, 0)
    return "its Hopper kernel takes bf16 only" if hopper and case.dtype != "bf16" else None


def _hidden_multiple_of_128(case, device):
    return None if case.D % 128 == 0 else f"needs a hidden size that is a multiple of 128 (D = {case.D})"


PROVIDERS = (
    Provider("torch_matmul", "baseline", _torch_matmul, computes=("logits",),
             note="torch.mm: h @ W.T (+ dz @ W, dz.T @ h): the throughput baseline"),
    Provider("covkernels_linear", "ours", _covkernels_linear, note="linear_logprobs_and_entropy"),
    Provider("unfused", "ours", _unfused(False), note="F.linear -> logits -> logprobs_and_entropy"),
    Provider("unfused_inplace", "ours", _unfused(True), ops=("linear_fwd_bwd",),
             note="the same, inplace_backward=True"),
    Provider("python_ref", "reference", _python_ref, skip=_ref_fits, note="eager, input dtype"),
    Provider("liger", "peer", _liger, computes=("logp",),
             note="liger_fused_linear_cross_entropy(reduction='none'): logp only"),
    Provider("liger_entropy", "peer", _liger_entropy, skip=_bf16_on_hopper,
             note="Liger fused linear scaled CE + entropy"),
    Provider("cce", "peer", _cce, computes=("logp",),
             note="cut_cross_entropy.linear_cross_entropy(reduction='none'): logp only, filtered grad"),
    Provider("verl_fused", "peer", _verl_fused, skip=_hidden_multiple_of_128,
             note="verl.utils.kernel linear_cross_entropy"),
)
