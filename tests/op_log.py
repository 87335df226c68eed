"""A dispatch mode that records the ops run below it: how the integration tests count passes over the logits."""
import torch
from torch.utils._python_dispatch import TorchDispatchMode


class OpLog(TorchDispatchMode):
    """Records every op run below it: covkernels' ops by name, and the shape of every other op's outputs."""

    def __init__(self):
        super().__init__()
        self.covkernels, self.shapes = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.name()
        if name.startswith("covkernels::"):
            self.covkernels.append(name.split("::")[1].split(".")[0])
        else:
            leaves = torch.utils._pytree.tree_leaves(out)
            self.shapes += [tuple(t.shape) for t in leaves if isinstance(t, torch.Tensor)]
        return out
