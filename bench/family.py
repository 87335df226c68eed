"""A benchmark family: one op's cases, its providers, and how a provider's outputs are got and checked.

Each family is a subclass in its own module (bench/logprobs.py, lm_head.py, policy_loss.py,
entropy_change.py, cpu_path.py), listed in bench/registry.py; bench/runner.py runs any of them, the main
job prints their tables and the pytest-benchmark suite is generated from them. The base class is the
logits pass's convention: inputs (logits, targets), outputs {"logp", "entropy", "grad"} of a provider
f(logits [B, T, V], targets [B, T]) -> (logp, entropy or None).
"""
import torch

from . import cases as C
from . import check, report, timing


class Family:
    name = ""  # the registry's key
    title = ""  # in the main job's header: "5 logits cases x 10 providers"
    ops = ()
    providers = ()
    in_main_job = True  # `python -m bench` runs it unless --ops says otherwise
    # CPU figures: CPU tensors and PyTorch paths, never the interpreter; run unasked only without a GPU,
    # torch.compile included, the providers timed in turns (the family's TURNS: rounds of warm-up, then of
    # timed calls).
    cpu_figures = False
    printed = ()  # (label, key of bench.registry.CONVENTIONS) printed under its table
    conventions = {}  # its own entries of the results file's conventions

    @property
    def by_name(self):
        return {p.name: p for p in self.providers}

    def cases(self, mode, ops=None):
        """The family's cases of a run whose op is among `ops` (None: all its ops), in the order they run."""
        return [c for c in self.all_cases(mode) if ops is None or c.op in ops]

    def all_cases(self, mode):
        """Every case of a run. mode: "tiny" (the interpreter: seconds on a CPU), "quick" (one realistic
        shape, for a GPU session with little time), "default" or "full" (bench/cases.py's shapes)."""
        raise NotImplementedError

    def make_inputs(self, case, device, seed):
        """One input set of a case, built on the device (requiring grad where the op has a backward)."""
        logits, targets = C.make_inputs(case, device, seed)
        return logits.requires_grad_(case.backward), targets

    def call(self, case, provider, fn, inputs, grads):
        """One call of the op: {output name: tensor}, the backward's gradients included."""
        logits, targets = inputs
        logp, ent = fn(logits, targets)
        out = {"logp": logp, "entropy": ent}
        if case.backward:
            # The gradient of sum(g_logp logp + g_entropy entropy), or of the log-prob's term alone.
            outs, upstream = ((logp,), grads[:1]) if ent is None else ((logp, ent), grads)
            (out["grad"],) = torch.autograd.grad(outs, logits, upstream)
        return out

    def reference(self, case, inputs, grads, device):
        """(the float64 and plain-PyTorch references at the checked places, those places)."""
        logits, targets = inputs
        rows = C.check_rows(case, device)
        g = tuple(x.reshape(-1)[rows] for x in grads)
        x = logits.detach().reshape(-1, case.V)[rows]
        return check.logits_reference(x, targets.reshape(-1)[rows], g, case.backward), rows

    def check_call(self, case, fn, run, where):
        """The call whose outputs are checked: the first timed call itself."""
        return run(0)

    def pick(self, case, provider, outputs, where):
        """The checked part of a call's outputs, by name, to compare with the reference's."""
        return {name: value.reshape(-1, *value.shape[2:])[where] for name, value in outputs.items()
                if value is not None}

    def finish_row(self, row, rows):
        """Figures a row takes from the rows of its case before it (a baseline's time)."""

    def peak_extra(self, run):
        return timing.peak_extra_rss_bytes(run) if self.cpu_figures else timing.peak_extra_bytes(run)

    def heading(self):
        """A line printed above the family's table, or None."""
        return None

    def table(self, rows):
        return report.table(rows)

    def targets(self, rows):
        """Lines measuring the rows against the family's targets."""
        return []
