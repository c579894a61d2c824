"""Comparing a rewritten model with the independent reference, ``bnfx.chunk_loop`` (MosaicML
Composer's GhostBatchNorm algorithm, written out as a Python loop over chunks)."""

from __future__ import annotations

import torch
from torch import nn

from bnfx.chunk_loop import unwrapped_state


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


def trained(model: nn.Module, steps) -> tuple[list, dict]:
    """SGD steps of ``model`` on ``(input, upstream gradient)`` pairs: the outputs, then the state."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    outputs = []
    for x, grad in steps:
        out = model(x)
        out.backward(grad)
        optimizer.step()
        optimizer.zero_grad()
        outputs.append(out.detach())
    return outputs, {key: value.detach().clone() for key, value in model.state_dict().items()}
