"""The entropy-change family: covkernels.entropy_change_from_logits, the first-order (Cui et al.'s Lemma 1)
and the measured entropy change of every row under an update of the logits, beside the reference.

A case (op "entropy_change") is a logits case whose inputs are two logits tensors, before and after an
update, and the row mask of its valid positions (rows outside it are never read). No peer computes this:
the providers are covkernels and plain PyTorch (python_ref), eager and compiled.

Bytes per case (Nv valid rows of N, e bytes per logit): read both logits' valid rows 2 Nv V e + the row
mask N + write predicted and actual 8N (0 on the rows outside the mask).

Each provider is f(before [B, T, V], after [B, T, V], row_mask [B, T] bool) -> (predicted, actual) [B, T].
"""
import dataclasses

import torch

import python_ref as ref

from . import cases as C
from .family import Family
from .providers import Provider, compiled

STEP = 0.05  # the update: sharpen the logits by STEP and add STEP x their scale of noise


@dataclasses.dataclass(frozen=True)
class ChangeCase(C.Case):
    @property
    def bytes_moved(self):
        N, V, e, Nv = self.N, self.V, self.torch_dtype.itemsize, C.n_valid(self)
        # read both logits' valid rows + the row mask, write predicted and actual
        return 2 * Nv * V * e + N + 8 * N

    @property
    def set_bytes(self):
        """Memory of one input set: both logits and the row mask."""
        return 2 * self.N * self.V * self.torch_dtype.itemsize + self.N


def make_inputs(case, device, seed=0):
    """(before, after [B, T, V], row_mask [B, T]): before = the logits of a logits case (3 N(0, 1)); after =
    (1 + STEP) before + STEP 3 N(0, 1), a step that lowers the entropy by about 0.3 nats at V = 4099, where
    the first order is still close; row_mask False past each sequence's valid length."""
    before, _ = C.make_inputs(case, device, seed)
    g = torch.Generator(device=device).manual_seed(seed + 1)
    noise = torch.randn(before.shape, device=device, dtype=before.dtype, generator=g)
    after = before * (1 + STEP) + noise * (3 * STEP)
    return before, after, C.padding_mask(case, device)


def _covkernels():
    import covkernels as ck

    return lambda before, after, mask: ck.entropy_change_from_logits(before, after, row_mask=mask)


def _python_ref(compile_it=False):
    fn = compiled(ref.entropy_change_from_logits) if compile_it else ref.entropy_change_from_logits
    return lambda before, after, mask: fn(before, after, row_mask=mask)


class EntropyChange(Family):
    name, title = "entropy_change", "entropy-change"
    ops = ("entropy_change",)
    in_main_job = False
    printed = (("entropy change", "entropy_change"),)
    conventions = {
        "entropy_change": "entropy-change rows (op entropy_change): inputs as above for the logits before "
                          f"the update, after = (1 + {STEP}) before + {3 * STEP:g} N(0, 1), the valid "
                          "positions as the row mask; bytes = both logits' valid rows + the row mask + the two "
                          "fp32 outputs; errors: predicted and actual at the checked rows"}
    providers = (
        Provider("covkernels", "ours", _covkernels, computes=("predicted", "actual")),
        Provider("python_ref", "reference", _python_ref, computes=("predicted", "actual"),
                 note="eager, input dtype"),
        Provider("compiled_ref", "reference", lambda: _python_ref(compile_it=True),
                 computes=("predicted", "actual"), note="torch.compile(python_ref)"),
    )

    def all_cases(self, mode):
        # Two logits tensors interpret as long as a backward: the heavy op's tiny shapes.
        return [ChangeCase("entropy_change", *s) for s in C.shapes(mode, heavy=True)]

    def make_inputs(self, case, device, seed):
        return make_inputs(case, device, seed)

    def call(self, case, provider, fn, inputs, grads):
        before, after, mask = inputs
        return dict(zip(("predicted", "actual"), fn(before, after, mask)))

    def reference(self, case, inputs, grads, device):
        before, after, mask = inputs
        rows = C.check_rows(case, device)
        x, y, m = before.reshape(-1, case.V)[rows], after.reshape(-1, case.V)[rows], mask.reshape(-1)[rows]
        out = {}
        for key, dtype in (("truth", torch.float64), ("plain", case.torch_dtype)):
            change = ref.entropy_change_from_logits(x.to(dtype), y.to(dtype), row_mask=m)
            out[key] = {"predicted": change.predicted, "actual": change.actual}
        return out, rows


FAMILY = EntropyChange()
