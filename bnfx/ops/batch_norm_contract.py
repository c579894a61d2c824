"""What every bnfx batch-norm op shares: argument checks, the statistics dtype, the state
outputs of the fake kernels, and the autograd set-up.

Every forward op takes ``(input, weight, bias, running_mean, running_var,
num_batches_tracked, ...)`` and returns ``(out, new_running_mean, new_running_var,
new_num_batches_tracked, *saved)``; its backward op takes ``(grad_out, input, weight,
*saved, *scalars)`` and returns ``(grad_input, grad_weight, grad_bias)``. The sync ops add
the chain of sync collectives: an ``order`` input and a last output, in both directions.
The output layout is declared here once (``output_names``), read by the passes, the run-time functions,
population statistics and the autograd set-up; the C++ side's ``kFirstSavedOutput``
(``csrc/op_support_cpu.h``) is compared with ``FIRST_SAVED`` by a test.
"""

from __future__ import annotations

import torch
from torch import Tensor

from bnfx import torch_internals

# The outputs of every bnfx forward op, in order: the normalized output, the new state (which
# the doors write back, or an exported program returns), then what the op's backward reads.
NEW_STATE = ("new_running_mean", "new_running_var", "new_num_batches_tracked")
FIRST_SAVED = 1 + len(NEW_STATE)
SAVED = {
    "ghost_batch_norm": ("save_mean", "save_invstd"),
    "sync_batch_norm": ("save_mean", "save_var", "count"),
    "module_batch_norm": (),  # a site for the passes: nothing of its own to save
}


# After the saved outputs, the sync op's link in the chain of sync collectives (its next
# ``order`` input; ``bnfx.collective_order``).
CHAINED = {"sync_batch_norm": ("order",)}


def output_names(op_name: str) -> tuple[str, ...]:
    """The outputs of the bnfx op ``op_name`` ("ghost_batch_norm", ...), by name, in order."""
    return ("out", *NEW_STATE, *SAVED[op_name], *CHAINED.get(op_name, ()))


def output_index(name: str) -> int:
    """Where every bnfx forward op returns ``name`` ("out" or one of ``NEW_STATE``)."""
    return ("out", *NEW_STATE).index(name)


def stat_dtype(input: Tensor) -> torch.dtype:
    """Statistics are float32 for float32 and reduced-precision input, float64 for float64."""
    return torch.promote_types(input.dtype, torch.float32)


# The dtypes batch norm computes in; float16/bfloat16 input may also take float32 parameters.
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_REDUCED = (torch.float16, torch.bfloat16)


def check_args(input: Tensor, weight, bias, running_mean, running_var, momentum, num_batches_tracked, eps,
               sizes_when_empty: bool = False) -> bool:
    """The checks every bnfx batch-norm op makes before any kernel runs, in torch's order and
    with torch's exception types (``F.batch_norm`` in training, then ``torch.batch_norm``); the
    C++ CPU kernels make the same (``csrc/op_support_cpu.h``). Returns whether ``input`` is
    empty: like torch, an empty input is checked no further and gives an empty output, unless
    ``sizes_when_empty`` (sync: a rank whose share is empty must refuse what its peers refuse,
    not wait for them in the all-reduce)."""
    if input.dim() < 2:
        raise ValueError(f"input must have at least 2 dimensions (N, C, ...), got shape {tuple(input.shape)}")
    # eps may be a graph value under dynamic shapes: a check, not a branch
    torch._check_value(eps > 0, lambda: f"batch_norm eps must be positive during training, but got {eps:g}")
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must both be given or both be None")
    if running_mean is not None and momentum is None and num_batches_tracked is None:
        raise ValueError("momentum=None (cumulative average) needs num_batches_tracked, got None")
    empty = input.numel() == 0
    if empty and not sizes_when_empty:
        return True
    channels = input.shape[1]
    parameters = {"running_mean": running_mean, "running_var": running_var, "weight": weight, "bias": bias}
    given = {name: t for name, t in parameters.items() if t is not None}
    for name, t in given.items():
        torch._check_with(
            RuntimeError, t.numel() == channels, lambda: f"{name} should contain {channels} elements not {t.numel()}"
        )
    if empty:
        return True
    if input.dtype not in FLOAT_DTYPES:
        raise NotImplementedError(
            f'"batch_norm" not implemented for {input.dtype}: input must be float16, bfloat16, float32 or float64'
        )
    dtypes = {t.dtype for t in given.values()}
    allowed = (input.dtype, torch.float32) if input.dtype in _REDUCED else (input.dtype,)
    if len(dtypes) > 1 or not dtypes <= set(allowed):
        described = ", ".join(f"{name} {t.dtype}" for name, t in given.items())
        raise RuntimeError(
            f"mixed dtype: input is {input.dtype} and {described}; weight, bias, running_mean and running_var "
            f"must all have the input's dtype{' or all float32' if input.dtype in _REDUCED else ''}, as torch's "
            f"batch norm requires"
        )
    return False


def check_backward_args(grad_out: Tensor, input: Tensor, weight, saved: dict[str, tuple[Tensor, tuple]]) -> None:
    """A backward op's tensors against its input (a direct call could pass any): ``saved`` maps
    each saved statistic's name to ``(tensor, the shape it must have)``. Same messages as the
    C++ kernels' (``csrc/op_support_cpu.h``). An empty input's weight goes unchecked, as in the
    forward."""
    if input.dim() < 2:
        raise RuntimeError(f"input must have at least 2 dimensions (N, C, ...), got shape {tuple(input.shape)}")
    torch._check(
        grad_out.shape == input.shape,
        lambda: f"grad_out should have the input's shape {tuple(input.shape)}, got {tuple(grad_out.shape)}",
    )
    if weight is not None and input.numel() != 0:
        torch._check(
            weight.numel() == input.shape[1],
            lambda: f"weight should contain {input.shape[1]} elements not {weight.numel()}",
        )
    for name, (t, shape) in saved.items():
        torch._check(tuple(t.shape) == tuple(shape), lambda: f"{name} should have shape {tuple(shape)}, got {tuple(t.shape)}")


def empty_outputs(input: Tensor, running_mean, running_var, num_batches_tracked, batches, saved, empty_dtype=None):
    """What a bnfx forward op returns for an empty input (no samples, or no values per channel),
    as torch's batch norm gives it: an empty output, the running statistics as they were, the
    counter moved by ``batches`` (torch counts an empty batch); ``saved``: the saved outputs.
    Absent state is empty, of ``empty_dtype`` (else the input's), as ``fake_state`` says."""

    def unchanged(state):
        return input.new_empty(0, dtype=empty_dtype) if state is None else state.clone()

    tracked = input.new_empty(0) if num_batches_tracked is None else num_batches_tracked + batches
    # an empty clone of the input, not a new tensor: the output stays a function of the input
    # (an empty gradient, an empty tangent), as torch's is
    return (input.clone(), unchanged(running_mean), unchanged(running_var), tracked, *saved)


def empty_input_grads(input: Tensor, weight):
    """A backward op's outputs for an empty input: an empty input gradient, zero weight and
    bias gradients (empty where there is no weight)."""
    if weight is None:
        return torch.empty_like(input), input.new_empty(0), input.new_empty(0)
    return torch.empty_like(input), torch.zeros_like(weight), torch.zeros_like(weight)


def fake_state(input: Tensor, running_mean, running_var, num_batches_tracked, empty_dtype=None) -> tuple:
    """Fake ``(new_running_mean, new_running_var, new_num_batches_tracked)``: like each state
    input, empty (of ``empty_dtype``, else the input's) where it is None."""

    def like(state):
        return input.new_empty(0, dtype=empty_dtype) if state is None else torch.empty_like(state)

    return like(running_mean), like(running_var), like(num_batches_tracked)


def laid_out_like(result: Tensor, input: Tensor) -> Tensor:
    """``result`` (of ``input``'s shape) with the strides the fake kernels give it,
    ``torch.empty_like(input)``'s: inductor trusts them (the ops are ``flexible_layout``)."""
    if result.stride() == input.stride():  # a fresh result is dense, so input is too
        return result
    like = torch.empty_like(input, dtype=result.dtype)
    return result if like.stride() == result.stride() else like.copy_(result)


def fake_input_grads(input: Tensor, weight):
    if weight is None:
        return torch.empty_like(input), input.new_empty(0), input.new_empty(0)
    return torch.empty_like(input), torch.empty_like(weight), torch.empty_like(weight)


def register_autograd(op, backward_op, scalars: tuple[str, ...], order: tuple[str, str] | None = None) -> None:
    """Autograd for ``op``: the state outputs are not differentiable (their in-graph write-back
    must not give buffers a grad_fn), the saved outputs and ``scalars`` (argument names of
    ``op``) are passed to ``backward_op``.

    ``order``: the names of ``op``'s chain arguments (the sync ops': ``("order", "site")``),
    whose last output is the chain's next link. That output is differentiable: its gradient
    (the next site's backward link) goes to ``backward_op`` with ``site``, and ``backward_op``'s
    last output is the gradient of the ``order`` input, so the backward collectives chain in
    the reverse order of the forward's."""
    names = [argument.name for argument in torch_internals.op_arguments(op)]
    positions = [names.index(name) for name in scalars]
    order_at = None if order is None else names.index(order[0])
    site_at = None if order is None else names.index(order[1])
    saved_end = -1 if order is not None else None

    def setup_context(ctx, inputs, output):
        input, weight, bias = inputs[:3]
        ctx.mark_non_differentiable(*output[1:saved_end])
        ctx.set_materialize_grads(False)  # no zero tensors for the outputs backward ignores
        ctx.save_for_backward(input, weight, *output[FIRST_SAVED:saved_end])
        ctx.scalars = [inputs[i] for i in positions]
        ctx.has_bias = bias is not None
        if order is not None:
            ctx.site = inputs[site_at]

    def backward(ctx, grad_out, *other_grads):
        input, weight, *saved = ctx.saved_tensors
        grads = [None] * len(names)
        if grad_out is None:  # only the non-differentiable outputs (or the chain's link) were used
            if order is not None:
                grads[order_at] = other_grads[-1]  # the link passes on to the earlier sites
            return tuple(grads)
        chain = () if order is None else (other_grads[-1], ctx.site)
        grad_input, grad_weight, grad_bias, *link = backward_op(grad_out, input, weight, *saved, *ctx.scalars, *chain)
        grads[0] = grad_input
        # None where weight or bias was None (the backward ops return empty tensors there)
        if weight is not None:
            grads[1] = grad_weight
            grads[2] = grad_bias if ctx.has_bias else None
        if order is not None:
            grads[order_at] = link[0]
        return tuple(grads)

    op.register_autograd(backward, setup_context=setup_context)
