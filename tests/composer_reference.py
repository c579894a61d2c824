"""An independent reference: MosaicML Composer's GhostBatchNorm algorithm, written out.

Composer wraps each batch-norm module and loops over ``input.chunk(ceil(B / g), 0)`` in
Python, dividing the momentum by the number of chunks. Where Composer raises on legal input,
this reference does what bnfx documents: a batch smaller than ``g`` is one chunk, and with
``momentum=None`` every chunk is one batch of torch's cumulative average (the module's own
``forward`` per chunk). Eval with running statistics normalizes without chunking.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


class ComposerGhostBatchNorm(nn.Module):
    def __init__(self, batchnorm: _BatchNorm, ghost_batch_size: int):
        super().__init__()
        self.batchnorm = batchnorm
        self.ghost_batch_size = ghost_batch_size

    def forward(self, input):
        bn = self.batchnorm
        uses_batch_stats = bn.training or not bn.track_running_stats
        if not uses_batch_stats:
            return bn(input)
        nchunks = math.ceil(input.shape[0] / self.ghost_batch_size)
        original = bn.momentum
        if bn.training and original is not None:
            bn.momentum = original / nchunks
        try:
            return torch.cat([bn(chunk) for chunk in input.chunk(nchunks, 0)], dim=0)
        finally:
            bn.momentum = original


def composer_model(model: nn.Module, ghost_batch_size: int) -> nn.Module:
    """A deep copy of ``model`` with every batch-norm module wrapped as Composer does."""
    model = copy.deepcopy(model)

    def swap(parent: nn.Module) -> None:
        for name, child in parent.named_children():
            if isinstance(child, _BatchNorm):
                setattr(parent, name, ComposerGhostBatchNorm(child, ghost_batch_size))
            else:
                swap(child)

    if isinstance(model, _BatchNorm):
        return ComposerGhostBatchNorm(model, ghost_batch_size)
    swap(model)
    return model


def unwrapped_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The reference's state_dict under the original (unwrapped) keys."""
    return {k.replace("batchnorm.", ""): v for k, v in model.state_dict().items()}


def assert_steps_equal(model: nn.Module, reference: nn.Module, net, inputs) -> None:
    """A training step of ``net`` (``model`` rewritten) and of ``reference`` on each input:
    outputs and every parameter gradient (dense upstream gradient), then running statistics."""
    for x in inputs:
        out, ref_out = net(x), reference(x)
        grad = torch.randn_like(out)
        out.backward(grad)
        ref_out.backward(grad)
        torch.testing.assert_close(out, ref_out)
        for (name, param), ref_param in zip(model.named_parameters(), reference.parameters()):
            torch.testing.assert_close(param.grad, ref_param.grad, msg=name)
        model.zero_grad()
        reference.zero_grad()
    for key, value in unwrapped_state(reference).items():
        torch.testing.assert_close(model.state_dict()[key], value, msg=key)
