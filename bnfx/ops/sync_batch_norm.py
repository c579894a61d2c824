"""torch.ops.bnfx.sync_batch_norm: batch norm with statistics over every process of a group.

Every rank gets what one process computes on the concatenation of all ranks' batches,
uneven and empty batches included. The group travels by name (``group.group_name``).

Statistics, one all-reduce of ``2 C + 1`` float64 values per forward:

1. each rank computes its count n, mean m and sum of squared deviations M2 (in float64 on
   CPU, C++; Welford in the statistics dtype elsewhere);
2. it turns them into sums shifted by K, the running mean (identical on every rank, and
   close to the batch mean once training has started; 0 without running statistics):
   ``[n, n (m - K), M2 + n (m - K)^2]`` in float64;
3. one all-reduce sums them, and ``mean = K + S1 / N``, ``var = S2 / N - (S1 / N)^2``.

Raw sums of x and x^2 in float32 lose the variance when the mean is large against the
spread (1e4 + 1e-2 randn: every digit cancels); shifting and float64 keep it. Counts stay
tensors throughout: no ``.item()``, no host synchronization, and an empty rank contributes
zeros. The backward all-reduces ``[sum(dy), sum(dy * x_hat)]`` (2 C values) once.

Normalization and the backward's reductions run on torch's own fused batch-norm kernels
(eval-mode forms, fed the global statistics), so channels_last, reduced precision and CUDA
take the same path; the input gradient is one C++ pass for contiguous fp32/fp64 CPU input,
PyTorch ops otherwise.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from bnfx.ops import cpu_kernels
from bnfx.ops.autograd_outputs import batch_norm_input_grads

_cpu_kernels = cpu_kernels.load()


def _stat_dtype(input: Tensor) -> torch.dtype:
    return torch.promote_types(input.dtype, torch.float32)


def _reduced_dims(input: Tensor) -> tuple[int, ...]:
    return (0,) + tuple(range(2, input.dim()))


def _check_args(input: Tensor, running_mean, momentum, num_batches_tracked):
    if input.dim() < 2:
        raise ValueError(f"input must have at least 2 dimensions (N, C, ...), got shape {tuple(input.shape)}")
    if running_mean is not None and momentum is None and num_batches_tracked is None:
        raise ValueError("momentum=None (cumulative average) needs num_batches_tracked, got None")


def _group(group_name: str):
    return dist.distributed_c10d._resolve_process_group(group_name)


def _local_moments(input: Tensor) -> tuple[Tensor, Tensor]:
    """``(mean, M2)`` per channel in float64: this rank's mean and sum of squared deviations."""
    if cpu_kernels.handles(_cpu_kernels, input):
        return _cpu_kernels.moments(input)
    count = input.numel() // input.shape[1]
    if count == 0:  # a shape, known on the host: no synchronization
        zeros = input.new_zeros(input.shape[1], dtype=torch.float64)
        return zeros, zeros
    var, mean = torch.var_mean(input.to(_stat_dtype(input)), _reduced_dims(input), correction=0)
    return mean.double(), var.double() * count


def _global_moments(input: Tensor, shift: Tensor, group) -> tuple[Tensor, Tensor, Tensor]:
    """``(mean, biased_var, count)`` over the group, float64; one all-reduce."""
    channels = input.shape[1]
    count = input.numel() // channels
    mean, m2 = _local_moments(input)
    offset = mean - shift
    sums = torch.cat([offset.new_full((1,), count), offset * count, m2 + offset * offset * count])
    dist.all_reduce(sums, group=group)
    total = sums[:1]
    shifted_mean = sums[1 : 1 + channels] / total
    var = (sums[1 + channels :] / total - shifted_mean * shifted_mean).clamp_(min=0)
    return shift + shifted_mean, var, total


def _new_state(running_mean, running_var, num_batches_tracked, mean, var, total, momentum):
    """``(new_running_mean, new_running_var, new_num_batches_tracked)``, empty where None."""
    new_tracked = mean.new_empty(0) if num_batches_tracked is None else num_batches_tracked + 1
    if running_mean is None:
        return mean.new_empty(0), mean.new_empty(0), new_tracked
    unbiased = var * total / (total - 1)
    if momentum is None:  # cumulative average: this batch is number num_batches_tracked + 1
        factor = 1.0 / (num_batches_tracked.to(torch.float64) + 1)
    else:
        factor = momentum
    new_mean = torch.lerp(running_mean.double(), mean, factor)
    new_var = torch.lerp(running_var.double(), unbiased, factor)
    # A group batch of 0 or 1 value per channel has no variance estimate (torch refuses such
    # batches; refusing here would need the count on the host): the statistics stay.
    estimable = total > 1
    new_mean = torch.where(estimable, new_mean, running_mean).to(running_mean.dtype)
    new_var = torch.where(estimable, new_var, running_var).to(running_var.dtype)
    return new_mean, new_var, new_tracked


@torch.library.custom_op("bnfx::sync_batch_norm", mutates_args=())
def sync_batch_norm(
    input: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    num_batches_tracked: Tensor | None,
    momentum: float | None,
    eps: float,
    group_name: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Training-mode batch norm with statistics over the process group named ``group_name``.

    Returns ``(out, new_running_mean, new_running_var, new_num_batches_tracked, save_mean,
    save_var, count)``: the state outputs are empty when the matching input is None;
    ``save_mean`` and ``save_var`` (biased) are the group's statistics [C], ``count`` [1] the
    number of values per channel over the group, all three for the backward.
    """
    _check_args(input, running_mean, momentum, num_batches_tracked)
    channels = input.shape[1]
    shift = (
        running_mean.detach().double()
        if running_mean is not None
        else input.new_zeros(channels, dtype=torch.float64)
    )
    mean, var, total = _global_moments(input, shift, _group(group_name))
    state = _new_state(running_mean, running_var, num_batches_tracked, mean, var, total, momentum)
    save_mean, save_var = mean.to(_stat_dtype(input)), var.to(_stat_dtype(input))
    weight, bias = (None if p is None else p.to(save_mean.dtype) for p in (weight, bias))
    out = torch.ops.aten._native_batch_norm_legit_no_training(input, weight, bias, save_mean, save_var, 0.0, eps)[0]
    return (out, *state, save_mean, save_var, total)


@sync_batch_norm.register_fake
def _(input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps, group_name):
    _check_args(input, running_mean, momentum, num_batches_tracked)
    stats = input.new_empty(input.shape[1], dtype=_stat_dtype(input))

    def like(state):
        return input.new_empty(0, dtype=torch.float64) if state is None else torch.empty_like(state)

    return (
        torch.empty_like(input),
        like(running_mean),
        like(running_var),
        like(num_batches_tracked),
        stats,
        torch.empty_like(stats),
        input.new_empty(1, dtype=torch.float64),
    )


@torch.library.custom_op("bnfx::sync_batch_norm_backward", mutates_args=())
def sync_batch_norm_backward(
    grad_out: Tensor,
    input: Tensor,
    weight: Tensor | None,
    save_mean: Tensor,
    save_var: Tensor,
    count: Tensor,
    eps: float,
    group_name: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of sync_batch_norm's output: ``(grad_input, grad_weight, grad_bias)``.

    ``grad_weight`` and ``grad_bias`` are this rank's share (data-parallel training sums or
    averages them over ranks); empty when ``weight`` is None. One all-reduce of 2 C values.
    """
    if input.numel() == 0:  # torch's kernel divides by the batch size
        sum_dy_xhat, sum_dy = save_mean.new_zeros(input.shape[1]), save_mean.new_zeros(input.shape[1])
    else:
        # torch's mixed-precision kernels take fp16/bf16 input with fp32 parameters
        stat_weight = None if weight is None else weight.to(save_mean.dtype)
        _, sum_dy_xhat, sum_dy = torch.ops.aten.native_batch_norm_backward(
            grad_out, input, stat_weight, save_mean, save_var, None, None, False, eps, [False, True, True]
        )
    sums = torch.stack([sum_dy, sum_dy_xhat]).to(save_mean.dtype)
    dist.all_reduce(sums, group=_group(group_name))
    # dx = a (dy - mean(dy) - x_hat mean(dy x_hat)), x_hat = (x - mean) invstd, means over
    # the group, written as dx = a dy - k x + c with per-channel a, k, c.
    invstd = torch.rsqrt(save_var + eps)
    a = invstd if weight is None else invstd * weight.to(invstd.dtype)
    mean_dy, mean_dy_xhat = sums / count.to(sums.dtype)
    k = a * invstd * mean_dy_xhat
    c = k * save_mean - a * mean_dy
    if cpu_kernels.handles(_cpu_kernels, input) and grad_out.dtype == input.dtype:
        grad_input = _cpu_kernels.affine_grad(grad_out, input, a, k, c)
    else:
        view = (-1,) + (1,) * (input.dim() - 2)
        grad_input = torch.addcmul(c.view(view), input, k.view(view), value=-1).addcmul_(grad_out, a.view(view))
        grad_input = grad_input.to(input.dtype)
    if weight is None:
        return grad_input, input.new_empty(0), input.new_empty(0)
    return grad_input, sum_dy_xhat.to(weight.dtype), sum_dy.to(weight.dtype)


@sync_batch_norm_backward.register_fake
def _(grad_out, input, weight, save_mean, save_var, count, eps, group_name):
    if weight is None:
        return torch.empty_like(input), input.new_empty(0), input.new_empty(0)
    return torch.empty_like(input), torch.empty_like(weight), torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    input, weight, bias, *_state, _momentum, eps, group_name = inputs
    _out, new_mean, new_var, new_tracked, save_mean, save_var, count = output
    ctx.mark_non_differentiable(new_mean, new_var, new_tracked, save_mean, save_var, count)
    ctx.save_for_backward(input, weight, save_mean, save_var, count)
    ctx.eps = eps
    ctx.group_name = group_name
    ctx.has_bias = bias is not None


def _backward(ctx, grad_out, *_state_grads):
    input, weight, save_mean, save_var, count = ctx.saved_tensors
    grad_input, grad_weight, grad_bias = torch.ops.bnfx.sync_batch_norm_backward(
        grad_out, input, weight, save_mean, save_var, count, ctx.eps, ctx.group_name
    )
    return batch_norm_input_grads(grad_input, grad_weight, grad_bias, weight, ctx.has_bias, other_inputs=6)


sync_batch_norm.register_autograd(_backward, setup_context=_setup_context)
