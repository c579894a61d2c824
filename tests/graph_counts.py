"""Graph-structure helpers shared by the pass tests."""

import torch
import torch.nn.functional as F
from torch import fx, nn


def count(gm: fx.GraphModule, target) -> int:
    """Calls of ``target`` (a function, a submodule path or a method name) in ``gm``."""
    return sum(n.target == target for n in gm.graph.nodes if n.op in ("call_function", "call_module", "call_method"))


class ThreeForms(nn.Module):
    """A module site, a functional training site and an eval-mode ``torch.batch_norm`` site."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.register_buffer("mean", torch.zeros(4))
        self.register_buffer("var", torch.ones(4))

    def forward(self, x):
        y = self.bn(self.conv(x))
        y = F.batch_norm(y, self.mean, self.var, None, None, True, 0.1, 1e-5)
        return torch.batch_norm(y, None, None, self.mean, self.var, False, 0.1, 1e-5, False)
