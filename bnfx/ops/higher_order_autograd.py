"""Double backward and forward-mode AD for the bnfx ops, through one differentiable composite
of each op.

The ops' kernels compute first derivatives only (their backward ops are opaque). Where more
is asked, each op has a composite: its body in primitive PyTorch ops (the inductor
decomposition's math, with a differentiable all-reduce for sync), which autograd, forward-mode
AD and torch.func differentiate to any order:

- **double backward** (``create_graph=True``, gradient penalties, Hessian-vector products):
  each backward op gets an autograd formula (``register_double_backward``): the
  vector-Jacobian product of the composite's first derivatives (``torch.func.vjp``);
- **forward-mode AD** (``torch.autograd.forward_ad``, ``torch.func.jvp``) and torch.func
  transforms: the C++ autograd kernels call the composite op ``bnfx::<op>_composite`` instead
  of their C++ node (``csrc/op_support_cpu.h``'s ``needs_composite``), the same op with the
  same schema whose one kernel is the composite (CompositeImplicitAutograd). The Python
  autograd layer (other devices, or no C++ kernels) cannot take tangents: it refuses them
  (``refuse_tangents``) rather than drop them.

Batch norm's running statistics and saved statistics are not differentiable outputs: the
composite returns them detached, as the ops mark them.
"""

from __future__ import annotations

import torch
import torch.autograd.forward_ad as forward_ad
import torch.distributed as dist
from torch import Tensor

from bnfx.torch_internals import op_arguments, op_schema, resolve_process_group

_library = torch.library.Library("bnfx", "FRAGMENT")

# op name ("ghost_batch_norm") -> its composite, as a Python function
_composites: dict[str, object] = {}


def define_composite(op, composite) -> None:
    """``bnfx::<op>_composite``: ``op``'s schema, ``composite`` its one kernel; its non-first
    outputs (state, saved statistics) detached."""
    name = op_schema(op).name.split("::")[1] + "_composite"
    schema = str(op_schema(op)).split("(", 1)[1]
    _library.define(f"{name}({schema}")

    def kernel(*args):
        out, *rest = composite(*args)
        return (out, *(t.detach() for t in rest))

    _library.impl(name, kernel, "CompositeImplicitAutograd")
    _composites[name.removesuffix("_composite")] = kernel


def composite_of(op):
    """``op``'s composite as a Python function (torch.func differentiates what it calls,
    autograd.Functions included, only above the dispatcher), or ``op`` where it has none."""
    return _composites.get(op.__name__.split(".")[0], op)  # "ghost_batch_norm" or "ghost_batch_norm.default"


def register_double_backward(backward_op, normalized, scalars: tuple[str, ...]) -> None:
    """An autograd formula for ``backward_op`` (``(grad_out, input, weight, *saved, *scalars)``
    -> ``(grad_input, grad_weight, grad_bias)``): the vector-Jacobian product of the first
    derivatives of ``normalized(input, weight, *scalars)`` (the composite's output, without
    bias) as functions of ``(grad_out, input, weight)``. The saved statistics are functions of
    the input, so their dependence is in that function (as in torch's
    ``batchnorm_double_backward``); they take no gradient of their own.

    torch.func.vjp, not autograd.grad: it differentiates the recomputed graph alone, never the
    graph that made ``grad_out`` (which autograd then differentiates itself), and its result
    is differentiable again where a higher derivative is asked."""
    names = [argument.name for argument in op_arguments(backward_op)]
    positions = [names.index(name) for name in scalars]

    def setup_context(ctx, inputs, output):
        grad_out, input, weight = inputs[:3]
        ctx.save_for_backward(grad_out, input, weight)
        ctx.scalars = [inputs[i] for i in positions]

    def backward(ctx, grad_grad_input, grad_grad_weight, grad_grad_bias, *_order_grad):
        grad_out, input, weight = ctx.saved_tensors
        needed = ctx.needs_input_grad[:3]
        unused = (None,) * (len(names) - 3)
        if not any(needed):
            return (None,) * 3 + unused
        primals = (grad_out, input) if weight is None else (grad_out, input, weight)

        def firsts_of(grad_out, input, weight=None):
            return first_derivatives(normalized, grad_out, input, weight, *ctx.scalars)

        firsts, vjp = torch.func.vjp(firsts_of, *primals)
        cotangents = (grad_grad_input, grad_grad_weight, grad_grad_bias)[: len(firsts)]
        cotangents = tuple(torch.zeros_like(f) if c is None else c for f, c in zip(firsts, cotangents))
        grads = vjp(cotangents) + (None,) * (3 - len(primals))
        return tuple(g if need else None for g, need in zip(grads, needed)) + unused

    backward_op.register_autograd(backward, setup_context=setup_context)


def first_derivatives(normalized, grad_out: Tensor, input: Tensor, weight: Tensor | None = None, *scalars):
    """``(grad_input, grad_weight, grad_bias)`` of ``normalized`` (no bias: its gradient is the
    sum of ``grad_out``); only ``grad_input`` without a weight."""
    if weight is None:
        _, vjp = torch.func.vjp(lambda x: normalized(x, None, *scalars), input)
        return vjp(grad_out)
    _, vjp = torch.func.vjp(lambda x, w: normalized(x, w, *scalars), input, weight)
    dims = (0,) + tuple(range(2, input.dim()))
    return (*vjp(grad_out), grad_out.sum(dims).to(weight.dtype))


def refuse_tangents(op_name: str, *tensors) -> None:
    """Forward-mode AD reached an op's Python autograd layer, which would drop the tangents:
    raise, naming where it works."""
    if forward_ad._current_level < 0:  # no dual level entered: nothing to check (one global read)
        return
    if any(t is not None and forward_ad.unpack_dual(t).tangent is not None for t in tensors):
        raise NotImplementedError(
            f"forward-mode AD through bnfx::{op_name} on {tensors[0].device.type} tensors needs the C++ CPU kernels' "
            f"autograd (CPU tensors); on other devices use reverse mode, or double backward"
        )


class GroupSum(torch.autograd.Function):
    """``sums`` summed over the process group named ``group_name``, differentiable to any order
    in both modes: the gradient and the tangent of a sum over ranks are the sums over ranks of
    theirs (one all-reduce each, the same on every rank)."""

    @staticmethod
    def forward(sums: Tensor, group_name: str) -> Tensor:
        summed = sums.clone()
        dist.all_reduce(summed, group=resolve_process_group(group_name))
        return summed

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.group_name = inputs[1]

    @staticmethod
    def backward(ctx, grad):
        return GroupSum.apply(grad, ctx.group_name), None

    @staticmethod
    def jvp(ctx, tangent, _):
        return GroupSum.apply(tangent, ctx.group_name)
