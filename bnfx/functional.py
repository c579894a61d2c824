"""Run-time entry points that rewritten graphs call when a site needs Python-level logic."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

import bnfx.ops  # noqa: F401  (registers torch.ops.bnfx.*)


def ghost_batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    *,
    ghost_batch_size: int,
    num_batches_tracked: Tensor | None = None,
) -> Tensor:
    """Training-mode ghost batch norm that updates the given running statistics in place.

    >>> y = ghost_batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias,
    ...                      ghost_batch_size=32, num_batches_tracked=bn.num_batches_tracked)
    """
    out, new_mean, new_var, new_tracked, _, _ = torch.ops.bnfx.ghost_batch_norm(
        input, weight, bias, running_mean, running_var, num_batches_tracked, ghost_batch_size, momentum, eps
    )
    with torch.no_grad():
        if running_mean is not None:
            running_mean.copy_(new_mean)
            running_var.copy_(new_var)
        if num_batches_tracked is not None:
            num_batches_tracked.copy_(new_tracked)
    return out


def ghost_batch_norm_module(module: _BatchNorm, input: Tensor, ghost_batch_size: int) -> Tensor:
    """What ``module(input)`` computes, with ghost statistics wherever it uses batch statistics.

    Reads the module's train/eval flag at call time, as ``_BatchNorm.forward`` does.
    """
    module._check_input_dim(input)
    uses_batch_stats = module.training or (module.running_mean is None and module.running_var is None)
    if not uses_batch_stats:
        return F.batch_norm(
            input, module.running_mean, module.running_var, module.weight, module.bias, False, 0.0, module.eps
        )
    updates_state = module.training and module.track_running_stats
    return ghost_batch_norm(
        input,
        module.running_mean if updates_state else None,
        module.running_var if updates_state else None,
        module.weight,
        module.bias,
        module.momentum,
        module.eps,
        ghost_batch_size=ghost_batch_size,
        num_batches_tracked=module.num_batches_tracked if updates_state else None,
    )
