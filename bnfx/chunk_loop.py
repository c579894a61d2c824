"""The algorithm bnfx replaces, for comparisons: MosaicML Composer's GhostBatchNorm chunk loop.

Composer wraps each batch-norm module and normalizes ``input.chunk(ceil(B / g), 0)`` one
chunk at a time in Python, with the momentum divided by the number of chunks. The demo
and the benchmarks run it beside bnfx.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


class ChunkLoopBatchNorm(nn.Module):
    """Composer's GhostBatchNorm forward around an existing batch-norm module."""

    def __init__(self, bn: _BatchNorm, ghost_batch_size: int):
        super().__init__()
        self.bn, self.ghost_batch_size = bn, ghost_batch_size

    def forward(self, x):
        if not self.bn.training:
            return self.bn(x)
        nchunks = math.ceil(x.shape[0] / self.ghost_batch_size)
        momentum = self.bn.momentum
        self.bn.momentum = momentum / nchunks
        try:
            return torch.cat([self.bn(chunk) for chunk in x.chunk(nchunks, 0)])
        finally:
            self.bn.momentum = momentum


def chunk_loop_model(model: nn.Module, ghost_batch_size: int) -> nn.Module:
    """A deep copy of ``model`` with every batch-norm module wrapped in the chunk loop."""
    model = copy.deepcopy(model)
    if isinstance(model, _BatchNorm):
        return ChunkLoopBatchNorm(model, ghost_batch_size)
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, _BatchNorm):
                setattr(module, name, ChunkLoopBatchNorm(child, ghost_batch_size))
    return model
