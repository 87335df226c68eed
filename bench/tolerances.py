"""The comparison rule of the test suite and of the benchmark's check, with its one tolerance table.

Rule (ml-cross-entropy's): against the float64 reference, a result's error may exceed SLACK[kind] x the error
of plain PyTorch in the input dtype (the reference run in that dtype on the same inputs) by at most
TOLERANCES[dtype][kind] * (1 + max |reference|). Kinds:
- "fwd", "bwd": covkernels' own forward outputs and gradients, in the tests: no worse than plain PyTorch.
  Separately, since every kernel accumulates in fp32, forward outputs must be within FP32_ACC of the
  reference whatever the input dtype (the inputs themselves are exact: the reference sees the same values).
- "bench": any provider the benchmark times, the peers included, before it is timed: a few times plain
  PyTorch's error, which lets through a peer that returns bf16 log-probs as plain PyTorch does, but not a
  wrong formula.

Here rather than in tests/ because the benchmark must not import the test suite (`python -m bench` runs
without it), and rather than in covkernels because it is no part of the library's API; the tests import it
as `bench.tolerances` (pyproject puts the checkout on pytest's path).
"""
import torch

TOLERANCES = {
    # "fwd": outputs in fp32; "bwd": gradients stored in the logits' dtype, one ulp of which is allowed
    # because the Triton interpreter truncates fp32 -> bf16/fp16 where a GPU rounds to nearest. An ulp of x
    # is up to 2^-7 |x| in bf16 (8 significant bits) and 2^-10 |x| in fp16 (11): half that let `make fuzz`
    # find truncated gradients of magnitude ~8 one ulp off (bf16, 1 case in 600).
    torch.bfloat16: {"fwd": 1e-5, "bwd": 2**-7, "bench": 2**-6},
    torch.float16: {"fwd": 1e-5, "bwd": 2**-10, "bench": 2**-9},
    torch.float32: {"fwd": 1e-5, "bwd": 1e-6, "bench": 1e-4},
    torch.float64: {"fwd": 1e-12, "bwd": 1e-12, "bench": 1e-12},
}
SLACK = {"fwd": 1, "bwd": 1, "bench": 4}
FP32_ACC = 5e-5


def max_err(a, b):
    """Largest |a - b|, with equal infinities (and NaN against NaN) counted as agreement; NaN where exactly
    one of them is NaN."""
    a, b = a.double(), b.double()
    same = (a == b) | (a.isnan() & b.isnan())
    return torch.where(same, 0.0, (a - b).abs()).max().item() if a.numel() else 0.0


def scale(ref64):
    """1 + the largest finite |reference|: what the tolerances are relative to."""
    finite = ref64[ref64.isfinite()]
    return 1.0 + finite.abs().max().item() if finite.numel() else 1.0


def error_and_bound(out, ref64, ref_lowp, dtype, kind):
    """(error of out, plain PyTorch's error, the largest error the rule allows) against ref64.

    out: the result; ref64: the reference in float64; ref_lowp: the reference run in `dtype`."""
    err, err_torch = max_err(out, ref64), max_err(ref_lowp, ref64)
    return err, err_torch, SLACK[kind] * err_torch + TOLERANCES[dtype][kind] * scale(ref64)


def assert_close_to_ref(out, ref64, ref_lowp, dtype, kind, name=""):
    """The tests' assertion: out within the rule for `kind` ("fwd" or "bwd"), a forward within FP32_ACC."""
    err, err_torch, bound = error_and_bound(out, ref64, ref_lowp, dtype, kind)
    assert err <= bound, \
        f"{name}: error {err:.3e} > plain-torch error {err_torch:.3e} + tolerance ({bound:.3e})"
    if kind == "fwd" and dtype != torch.float64:
        acc = FP32_ACC * scale(ref64)
        assert err <= acc, f"{name}: error {err:.3e} above fp32 accumulation ({acc:.3e})"
