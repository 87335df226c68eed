"""Input builders shared by the tests."""
import functools

import torch
import triton
import triton.language as tl

LAYOUTS = ("flat", "bt", "sliced", "padded")


def make_logits(layout, n_rows, V, dtype, scale=3.0, seed=0):
    """Fresh random logits with n_rows rows of V in one of LAYOUTS:
    flat [N, V]; bt [B, T, V]; sliced logits[:, :-1] of [B, T + 1, V] (leading dims that do not merge);
    padded: rows of a wider [N, V + 13] buffer (row stride > V)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    if layout == "flat":
        return rand(n_rows, V)
    if layout == "bt":
        return rand(2, n_rows // 2, V)
    if layout == "sliced":
        return rand(2, n_rows // 2 + 1, V)[:, :-1]
    if layout == "padded":
        return rand(n_rows, V + 13)[:, :V]
    raise ValueError(layout)


def make_targets(logits, ignore_every=3, ignore_index=-100, dtype=torch.int64, seed=1):
    """Random targets of shape logits.shape[:-1], every `ignore_every`-th row set to ignore_index."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, logits.shape[-1], logits.shape[:-1], generator=g, dtype=dtype)
    if ignore_every:
        t.view(-1)[1::ignore_every] = ignore_index
    return t


def upstream(shape, seed=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


@functools.cache
def fma_rounds_once():
    """Whether tl.fma rounds once, as the GPU's FFMA does. Triton 3.6's interpreter computes x * y + z in
    fp32 with two roundings (fixed by 3.9's); (1 + 2^-12)^2 - 1 tells them apart: 2^-11 + 2^-24 fused,
    2^-11 with the product rounded first."""
    @triton.jit
    def fma_kernel(ptr):
        x = tl.load(ptr)
        tl.store(ptr, tl.fma(x, x, -1.0))

    x = torch.tensor([1 + 2.0**-12], device="cuda" if torch.cuda.is_available() else "cpu")
    fma_kernel[(1,)](x)
    return x.item() == 2.0**-11 + 2.0**-24
