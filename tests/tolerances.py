"""The one tolerance table of the test suite, and the comparison rule every numeric test uses.

Rule (ml-cross-entropy's): against the float64 reference, the kernel's error may exceed plain PyTorch's
error in the input dtype by at most TOLERANCES[dtype][kind] * (1 + max |reference|). Separately, since
every kernel accumulates in fp32, forward outputs must be within FP32_ACC of the reference whatever
the input dtype (the inputs themselves are exact: the reference sees the same rounded values).
"""
import torch

TOLERANCES = {
    # "fwd": outputs in fp32; "bwd": gradients stored in the logits' dtype, one ulp of which is allowed
    # because the Triton interpreter truncates fp32 -> bf16/fp16 where a GPU rounds to nearest. An ulp of x
    # is up to 2^-7 |x| in bf16 (8 significant bits) and 2^-10 |x| in fp16 (11): half that let `make fuzz`
    # find truncated gradients of magnitude ~8 one ulp off (bf16, 1 case in 600).
    torch.bfloat16: {"fwd": 1e-5, "bwd": 2**-7},
    torch.float16: {"fwd": 1e-5, "bwd": 2**-10},
    torch.float32: {"fwd": 1e-5, "bwd": 1e-6},
    torch.float64: {"fwd": 1e-12, "bwd": 1e-12},
}
FP32_ACC = 5e-5


def max_err(a, b):
    """Largest |a - b|, with equal infinities counted as agreement."""
    a, b = a.double(), b.double()
    same = (a == b) | (a.isnan() & b.isnan())
    return torch.where(same, 0.0, (a - b).abs()).max().item() if a.numel() else 0.0


def assert_close_to_ref(out, ref64, ref_lowp, dtype, kind, name=""):
    """out: kernel result; ref64: reference in float64; ref_lowp: reference run in `dtype`."""
    scale = 1.0 + ref64[ref64.isfinite()].abs().max().item() if ref64.isfinite().any() else 1.0
    err, err_torch = max_err(out, ref64), max_err(ref_lowp, ref64)
    bound = err_torch + TOLERANCES[dtype][kind] * scale
    assert err <= bound, f"{name}: error {err:.3e} > plain-torch error {err_torch:.3e} + tolerance ({bound:.3e})"
    if kind == "fwd" and dtype != torch.float64:
        assert err <= FP32_ACC * scale, f"{name}: error {err:.3e} above fp32 accumulation ({FP32_ACC * scale:.3e})"
