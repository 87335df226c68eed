"""Checks of user input, run before any kernel launch; each error names the argument at fault."""
import math
import numbers
import os

import torch

LOGIT_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
TARGET_DTYPES = (torch.int32, torch.int64)
IMPLS = ("auto", "triton", "torch")
# TRITON_INTERPRET must be set before any @triton.jit function is defined, so it is read once.
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
LOG2E = 1.4426950408889634


def check_tensor(name, x, dtypes):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {x.dtype}")


def check_same_device(name, x, ref_name, ref):
    if x.device != ref.device:
        raise ValueError(f"{name} is on {x.device} but {ref_name} is on {ref.device}")


def check_positive(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be finite and > 0, got {value}")


def check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def check_temperature_range(temperature):
    """A temperature whose reciprocal (times log2 e) is not a normal fp32 number cannot be applied in fp32:
    ValueError naming it (1e-40 would make every output NaN, 1e39 every row uniform)."""
    tiny, big = torch.finfo(torch.float32).tiny, torch.finfo(torch.float32).max
    inv = 1.0 / temperature
    if not (tiny <= inv and LOG2E * inv <= big and math.isfinite(inv)):
        raise ValueError(f"temperature must be in [{LOG2E / big:.3g}, {1 / tiny:.3g}] (1/temperature a normal "
                         f"fp32 number), got {temperature}")


def _check_options(temperature, ignore_index, impl):
    check_positive("temperature", temperature)
    check_temperature_range(temperature)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    check_choice("impl", impl, IMPLS)


def check_logits_targets(logits, targets, temperature, ignore_index, impl, validate):
    """Validates the inputs of the fused pass; returns True when the Triton kernels should run."""
    check_tensor("logits", logits, LOGIT_DTYPES)
    check_tensor("targets", targets, TARGET_DTYPES)
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits must have a non-empty vocabulary (last dim), got shape {tuple(logits.shape)}")
    if targets.shape != logits.shape[:-1]:
        raise ValueError(f"targets must have shape logits.shape[:-1] = {tuple(logits.shape[:-1])}, "
                         f"got {tuple(targets.shape)}")
    check_same_device("targets", targets, "logits", logits)
    _check_options(temperature, ignore_index, impl)
    use_triton = use_triton_for("logits", logits, impl)
    if validate and not torch.compiler.is_compiling():
        check_targets_in_range(targets, logits.shape[-1], ignore_index)
    return use_triton


def use_triton_for(name, x, impl):
    """The one dispatch between implementations, for every op: whether the Triton kernels run on the tensor x
    (the argument `name`) for impl in IMPLS: on CUDA tensors, or on the CPU under TRITON_INTERPRET=1; never
    for fp64, which the chunked PyTorch path computes in fp64 (the kernels accumulate in fp32 with fp32
    scalars)."""
    if impl == "torch":
        return False
    triton_ok = (x.is_cuda or INTERPRETING) and x.dtype != torch.float64
    if impl == "triton" and not triton_ok:
        raise ValueError(f"impl='triton' needs {name} in bf16, fp16 or fp32 on a CUDA device, or TRITON_INTERPRET=1 "
                         f"set before importing covkernels to run the kernels on the CPU (got {x.dtype} on "
                         f"{x.device}); fp64 takes impl='torch'")
    return triton_ok


def check_targets_in_range(targets, V, ignore_index):
    """Data-dependent check (one host sync): every target is ignore_index or in [0, V)."""
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= V))
    if bool(bad.any()):
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"targets must be in [0, {V}) or ignore_index={ignore_index}; "
                         f"targets{list(first)} = {int(targets[first])}")


def check_nonnegative(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not value >= 0:
        raise ValueError(f"{name} must be >= 0, got {value}")


def check_fraction(name, value):
    """A fraction in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not 0 <= value < 1:
        raise ValueError(f"{name} must be in [0, 1), got {value}")


def check_lm_head(hidden, weight, bias, targets, temperature, ignore_index, impl, validate):
    """Validates the inputs of the fused LM head; returns True when the Triton kernels should run."""
    check_tensor("hidden", hidden, LOGIT_DTYPES)
    check_tensor("weight", weight, LOGIT_DTYPES)
    if hidden.dim() < 1 or hidden.shape[-1] == 0:
        raise ValueError(f"hidden must be [..., D] with D > 0, got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1] or weight.shape[0] == 0:
        raise ValueError(f"weight must be [V, D] with V > 0 and D = hidden.shape[-1] = {hidden.shape[-1]}, "
                         f"got shape {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight must have hidden's dtype {hidden.dtype}, got {weight.dtype}")
    check_same_device("weight", weight, "hidden", hidden)
    if bias is not None:
        check_tensor("bias", bias, LOGIT_DTYPES)
        if bias.shape != weight.shape[:1]:
            raise ValueError(f"bias must have shape [V] = [{weight.shape[0]}], got {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias must have hidden's dtype {hidden.dtype}, got {bias.dtype}")
        check_same_device("bias", bias, "hidden", hidden)
    check_tensor("targets", targets, TARGET_DTYPES)
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(f"targets must have shape hidden.shape[:-1] = {tuple(hidden.shape[:-1])}, "
                         f"got {tuple(targets.shape)}")
    check_same_device("targets", targets, "hidden", hidden)
    _check_options(temperature, ignore_index, impl)
    use_triton = use_triton_for("hidden", hidden, impl)
    if validate and not torch.compiler.is_compiling():
        check_targets_in_range(targets, weight.shape[0], ignore_index)
    return use_triton
