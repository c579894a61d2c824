"""The algorithm bnfx replaces, written out: MosaicML Composer's GhostBatchNorm chunk loop.

Composer wraps each batch-norm module and normalizes ``input.chunk(ceil(B / g), 0)`` one
chunk at a time in Python, with the momentum divided by the number of chunks. Where
Composer raises on legal input, this loop does what bnfx documents: a batch smaller than
``g`` is one chunk, and with ``momentum=None`` every chunk is one batch of torch's
cumulative average (the module's own forward per chunk). Batches normalized with batch
statistics are chunked (training, and eval without running statistics); eval with running
statistics is not.

The one reference for tests, the demo and the benchmarks.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm


def ghost_chunk_loop(input: Tensor, weight, bias, running_mean, running_var, num_batches_tracked,
                     ghost_batch_size: int, momentum: float | None, eps: float) -> Tensor:
    """Training-mode ghost batch norm as the loop computes it, on ``F.batch_norm``: updates
    the given running statistics (and counter) in place, chunk after chunk."""
    nchunks = math.ceil(input.shape[0] / ghost_batch_size)
    outs = []
    for chunk in input.chunk(nchunks, 0):
        if num_batches_tracked is not None:
            num_batches_tracked += 1
        factor = 1.0 / float(num_batches_tracked) if momentum is None else momentum / nchunks
        outs.append(F.batch_norm(chunk, running_mean, running_var, weight, bias, True, factor, eps))
    return torch.cat(outs)


class ChunkLoopBatchNorm(nn.Module):
    """Composer's GhostBatchNorm around an existing batch-norm module (kept as ``batchnorm``,
    Composer's name, and called per chunk: a subclass's own forward runs per chunk)."""

    def __init__(self, batchnorm: _BatchNorm, ghost_batch_size: int):
        super().__init__()
        self.batchnorm, self.ghost_batch_size = batchnorm, ghost_batch_size

    def forward(self, input: Tensor) -> Tensor:
        bn = self.batchnorm
        if not (bn.training or not bn.track_running_stats):
            return bn(input)
        nchunks = math.ceil(input.shape[0] / self.ghost_batch_size)
        original = bn.momentum
        if bn.training and original is not None:
            bn.momentum = original / nchunks
        try:
            return torch.cat([bn(chunk) for chunk in input.chunk(nchunks, 0)], dim=0)
        finally:
            bn.momentum = original


def chunk_loop_model(model: nn.Module, ghost_batch_size: int) -> nn.Module:
    """A deep copy of ``model`` with every batch-norm module wrapped in the chunk loop."""
    model = copy.deepcopy(model)
    if isinstance(model, _BatchNorm):
        return ChunkLoopBatchNorm(model, ghost_batch_size)
    _wrap_children(model, ghost_batch_size)
    return model


def _wrap_children(parent: nn.Module, ghost_batch_size: int) -> None:
    for name, child in parent.named_children():
        if isinstance(child, _BatchNorm):
            setattr(parent, name, ChunkLoopBatchNorm(child, ghost_batch_size))
        else:
            _wrap_children(child, ghost_batch_size)


def unwrapped_state(model: nn.Module) -> dict[str, Tensor]:
    """A chunk-loop model's state_dict under the original model's keys."""
    return {key.replace("batchnorm.", ""): value for key, value in model.state_dict().items()}
