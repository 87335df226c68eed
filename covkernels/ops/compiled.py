"""torch.compile for the chunked PyTorch paths: a big block of rows runs as one fused loop per row instead
of a dozen eager passes over memory (what makes the CPU path fast); small blocks, as tests use, stay eager.

`run(fn, x, *args)` calls fn(x, *args) without autograd, through torch.compile(fn, dynamic=True) when the
block x has at least MIN_ELEMS elements and no dimension of size 1 (dynamic shapes still specialise sizes
0 and 1). Sizes, strides and scalars are symbolic: one graph per dtype and layout (contiguous, strided,
in place), compiled at its first call, never again for new shapes or temperatures. If compiling fails
(no C++ compiler, say), one warning, and the eager function from then on.
"""
import functools
import warnings

import torch

MIN_ELEMS = 1 << 20
_failed = []  # the first compile error: once one happened, every call runs eagerly


@functools.cache
def _compiled(fn):
    return torch.compile(fn, dynamic=True)


def compiles(numel):
    """Whether `run` compiles a block of `numel` elements (of at least two rows and two columns). A loop
    whose blocks compile may make them as big as it likes: a compiled block holds no [rows, columns]
    temporaries, and fewer calls mean fewer thread barriers."""
    return not _failed and numel >= MIN_ELEMS


def run(fn, x, *args):
    """fn(x, *args) under no_grad, compiled when x [rows, columns] is big enough (see the module docstring)."""
    with torch.no_grad():
        if not compiles(x.numel()) or min(x.shape) < 2:
            return fn(x, *args)
        try:
            return _compiled(fn)(x, *args)
        except Exception as e:  # noqa: BLE001 -- any compiler failure; a real error recurs eagerly below
            _failed.append(e)
            first_line = str(e).splitlines()[0][:200] if str(e) else ""
            warnings.warn(f"covkernels: torch.compile of the CPU path failed ({type(e).__name__}: {first_line}); "
                          "it runs eagerly (slower) from now on", RuntimeWarning, stacklevel=2)
            return fn(x, *args)
