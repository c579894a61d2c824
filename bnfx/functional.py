"""Run-time entry points that rewritten graphs call when a site needs Python-level logic."""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.lazy import LazyModuleMixin

import bnfx.ops  # noqa: F401  (registers torch.ops.bnfx.*)
from bnfx import collective_order, torch_internals
from bnfx.ops import batch_norm_contract as contract
from bnfx.ops import collective_tags
from bnfx.ops import higher_order_autograd as higher_order
from bnfx.own_forward import run_own_forward
from bnfx.recomputation import recomputing, run_checkpointed


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
    return _updating_state(
        torch.ops.bnfx.ghost_batch_norm, input, weight, bias, running_mean, running_var, num_batches_tracked,
        ghost_batch_size, momentum, eps,
    )


def sync_batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    *,
    group: dist.ProcessGroup | None = None,
    num_batches_tracked: Tensor | None = None,
    site: str = "",
) -> Tensor:
    """Training-mode batch norm over every rank of ``group`` (default: WORLD); updates the
    given running statistics in place, identically on every rank. ``site`` names the call in
    the error a mismatch of the ranks' collectives raises.

    >>> y = sync_batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias,
    ...                     num_batches_tracked=bn.num_batches_tracked, site="encoder.bn1")
    """
    return _sync_batch_norm(
        input, running_mean, running_var, weight, bias, momentum, eps,
        group_name=(group or dist.group.WORLD).group_name, num_batches_tracked=num_batches_tracked,
        site=collective_tags.site_tag(site) if site else 0,
    )


def _sync_batch_norm(input, running_mean, running_var, weight, bias, momentum, eps, *, group_name, num_batches_tracked,
                     site: int):
    """The sync op, chained after the previous sync call (``collective_order``)."""
    return _updating_state(
        torch.ops.bnfx.sync_batch_norm, input, weight, bias, running_mean, running_var, num_batches_tracked,
        momentum, eps, group_name, collective_order.take(), site, chained=True,
    )


def module_batch_norm(input, running_mean, running_var, weight, bias, momentum, eps, *, group_name, num_batches_tracked):
    """``torch.ops.bnfx.module_batch_norm`` (a site for bnfx's passes) that updates the given
    running statistics in place."""
    return _updating_state(
        torch.ops.bnfx.module_batch_norm.default, input, weight, bias, running_mean, running_var,
        num_batches_tracked, momentum, eps, group_name,
    )


_OUT = contract.output_index("out")
_NEW_STATE = slice(contract.output_index(contract.NEW_STATE[0]), contract.FIRST_SAVED)


def _updating_state(op, input, weight, bias, running_mean, running_var, num_batches_tracked, *scalars,
                    chained=False) -> Tensor:
    """``op``'s output (a bnfx op), with the new state written back in place; ``chained``: the
    op's last output is the collective chain's next link."""
    if torch_internals.func_transforms_active():
        # torch.func differentiates the op's composite; the C++ node it refuses (and the sync
        # op's differentiable all-reduce works only called from here, above the op)
        op = higher_order.composite_of(op)
    outputs = op(input, weight, bias, running_mean, running_var, num_batches_tracked, *scalars)
    if chained:
        collective_order.put(outputs[-1])
    out, (new_mean, new_var, new_tracked) = outputs[_OUT], outputs[_NEW_STATE]
    if recomputing():  # the forward of this step wrote it already
        return out
    # The new state is not differentiable, so writing it into state that takes no gradient
    # records nothing, and no_grad (several us a call, as much as a small layer's kernel) is
    # needed only for state that does. Export must not see one: it would turn the block into a
    # higher-order op its verifier refuses to save.
    takes_gradient = running_mean is not None and (running_mean.requires_grad or running_var.requires_grad)
    no_grad = torch.no_grad() if takes_gradient and not torch.compiler.is_exporting() else contextlib.nullcontext()
    with no_grad:
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
    return batch_stats_module(module, input, ghost_batch_norm, ghost_batch_size=ghost_batch_size)


def sync_batch_norm_module(module: _BatchNorm, input: Tensor, group_name: str, site: int = 0) -> Tensor:
    """What ``module(input)`` computes, with statistics over the process group ``group_name``
    wherever it uses batch statistics. Reads the train/eval flag at call time. ``site``: the
    module's tag (``collective_tags.site_tag``)."""
    return batch_stats_module(module, input, _sync_batch_norm, group_name=group_name, site=site)


def ghost_batch_norm_of(module, input, weight, bias, running_mean, running_var, num_batches_tracked, momentum,
                        eps, ghost_batch_size: int) -> Tensor:
    """A batch-norm call traced on a module's own running statistics (its forward traced
    through): ghost statistics while ``module`` trains, the running statistics in eval, as its
    forward decides at call time. A batch-norm ``module`` gives its momentum and counter too;
    the container symbolic_trace leaves in its place, its train/eval flag alone."""
    return _on_module_state(
        module, input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps,
        ghost_batch_norm, ghost_batch_size=ghost_batch_size,
    )


def sync_batch_norm_of(module, input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps,
                       group_name: str | None, site: int = 0) -> Tensor:
    """``ghost_batch_norm_of`` with statistics over the process group ``group_name``; None:
    plain batch norm (no group to synchronize over)."""
    group = {} if group_name is None else {"group_name": group_name, "site": site}
    batch_norm = _plain_batch_norm if group_name is None else _sync_batch_norm
    return _on_module_state(
        module, input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps, batch_norm, **group
    )


def _plain_batch_norm(input, running_mean, running_var, weight, bias, momentum, eps, *, num_batches_tracked):
    """Training-mode batch norm as ``_BatchNorm.forward`` computes it, counter included."""
    if recomputing():
        return F.batch_norm(input, None, None, weight, bias, True, 0.0, eps)
    if num_batches_tracked is not None:
        with torch.no_grad():
            num_batches_tracked.add_(1)
    factor = 1.0 / float(num_batches_tracked) if momentum is None else momentum
    return F.batch_norm(input, running_mean, running_var, weight, bias, True, factor, eps)


def _on_module_state(module, input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps,
                     batch_norm, **kwargs) -> Tensor:
    if not module.training:
        return F.batch_norm(input, running_mean, running_var, weight, bias, False, 0.0, eps)
    if isinstance(module, _BatchNorm):
        momentum, num_batches_tracked = module.momentum, module.num_batches_tracked
    return batch_norm(input, running_mean, running_var, weight, bias, momentum, eps,
                      num_batches_tracked=num_batches_tracked, **kwargs)


def frozen_batch_norm_module(module: _BatchNorm, input: Tensor) -> Tensor:
    """``module(input)`` normalized with its running statistics, which stay as they are, in
    train and eval mode; weight and bias get no gradient (MegEngine's ``freeze=True``)."""
    _initialize_lazy(module, input)
    module._check_input_dim(input)
    return _frozen_batch_norm(input, module.running_mean, module.running_var, module.weight, module.bias, 0.0, module.eps)


def ghost_own_forward(module: _BatchNorm, ghost_batch_size: int, *args, **kwargs):
    """``module(*args, **kwargs)``, a subclass with its own forward, with ghost statistics in
    the batch-norm call inside it."""
    return run_own_forward(module, ghost_batch_norm, {"ghost_batch_size": ghost_batch_size}, *args, **kwargs)


def sync_own_forward(module: _BatchNorm, group_name: str, site: int, *args, **kwargs):
    """``module(*args, **kwargs)``, a subclass with its own forward, with statistics over the
    process group ``group_name`` in the batch-norm call inside it."""
    return run_own_forward(module, _sync_batch_norm, {"group_name": group_name, "site": site}, *args, **kwargs)


def frozen_own_forward(module: _BatchNorm, *args, **kwargs):
    """``module(*args, **kwargs)``, a subclass with its own forward, whose batch-norm calls on
    its running statistics are frozen as ``frozen_batch_norm_module``'s."""
    return run_own_forward(module, _frozen_batch_norm, {}, *args, every_call=True, **kwargs)


def _frozen_batch_norm(input, running_mean, running_var, weight, bias, momentum, eps, *, num_batches_tracked=None):
    weight = None if weight is None else weight.detach()
    bias = None if bias is None else bias.detach()
    return F.batch_norm(input, running_mean, running_var, weight, bias, False, 0.0, eps)


def batch_stats_module(module: _BatchNorm, input: Tensor, batch_norm, **kwargs) -> Tensor:
    """``_BatchNorm.forward`` with ``batch_norm`` wherever it would use batch statistics."""
    _initialize_lazy(module, input)
    module._check_input_dim(input)
    uses_batch_stats = module.training or (module.running_mean is None and module.running_var is None)
    if not uses_batch_stats:
        return F.batch_norm(
            input, module.running_mean, module.running_var, module.weight, module.bias, False, 0.0, module.eps
        )
    updates_state = module.training and module.track_running_stats
    return batch_norm(
        input,
        module.running_mean if updates_state else None,
        module.running_var if updates_state else None,
        module.weight,
        module.bias,
        module.momentum,
        module.eps,
        num_batches_tracked=module.num_batches_tracked if updates_state else None,
        **kwargs,
    )


def _initialize_lazy(module: _BatchNorm, input: Tensor) -> None:
    """A lazy batch norm's first call: what its own forward pre-hook does (infer the channels
    from ``input``, create parameters and buffers, become the regular class)."""
    if isinstance(module, LazyModuleMixin) and module.has_uninitialized_params():
        module._infer_parameters(module, (input,))


# The functions rewritten GraphModules call: tracers keep them as calls (``bnfx.tracing``).
RUNTIME_FUNCTIONS = (
    ghost_batch_norm_module, sync_batch_norm_module, frozen_batch_norm_module, ghost_own_forward, sync_own_forward,
    frozen_own_forward, ghost_batch_norm_of, sync_batch_norm_of, run_checkpointed,
)
