"""torch.ops.bnfx.sync_batch_norm: batch norm with statistics over every process of a group.

Every rank gets what one process computes on the concatenation of all ranks' batches,
uneven and empty batches included. The group travels by name (``group.group_name``).

Statistics, one all-reduce of ``3 C + 1`` float64 values per forward (and the 3 values that
say which collective it is, ``collective_tags``; the ``order`` argument chains the calls,
``bnfx.collective_order``):

1. each rank computes its count n, mean m and sum of squared deviations M2 per channel,
   in float64 (C++ on CPU, Triton's float64 merge of shifted fp32 partials on CUDA; the
   default body: torch.var in the statistics dtype and a float64 sum for the mean);
2. it turns them into sums shifted by K, the running mean (identical on every rank, and
   close to the batch mean once training has started; 0 without running statistics):
   ``[n, n (m - K), M2 + n (m - K)^2, n m]`` in float64;
3. one all-reduce sums them, and ``mean = S3 / N`` (the raw sums: the same in every kernel,
   and no function of the running mean), ``var = S2 / N - (S1 / N)^2``.

Raw sums of x and x^2 in float32 lose the variance when the mean is large against the
spread (1e4 + 1e-2 randn: every digit cancels); shifting and float64 keep it. Counts stay
tensors throughout: no ``.item()``, no host synchronization, and an empty rank contributes
zeros. The backward all-reduces ``[sum(dy), sum(dy * x_hat)]`` (2 C values, and the 3) once.

The collectives are the op's own, on every device (gloo for CPU tensors, NCCL for CUDA).
The op's layers, in dispatch order:

- autograd: on CPU the C++ autograd kernel (``csrc/sync_batch_norm_cpu.cpp``, AutogradCPU),
  elsewhere ``batch_norm_contract.register_autograd``; both call
  ``bnfx::sync_batch_norm_backward``, which has the same layers below autograd;
- fake tensors (``register_fake``): the output shapes, and the argument checks;
- CPU: the C++ kernels (``csrc/sync_batch_norm_cpu.cpp``, registered from C++): this body in
  C++, with the C++ statistics, for every CPU call;
- CUDA, fp32/fp16/bf16 input: this body around Triton's local work (``_TritonKernels``,
  through ``device_kernels.register_local_kernels``);
- the default body, any other device, layout and dtype: PyTorch's local work
  (``_LocalKernels``); it normalizes with torch's own fused eval-mode kernels fed the global
  statistics.

Inductor gets decompositions instead (``DECOMPOSITIONS``, ``_DecomposedKernels``): this body
in primitives, which it fuses with the layers around, the all-reduces as functional
collectives.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from bnfx import torch_internals
from bnfx.ops import batch_norm_contract as contract
from bnfx.ops import collective_tags, device_kernels
from bnfx.ops import higher_order_autograd as higher_order
from bnfx.torch_internals import resolve_process_group


def _reduced_dims(input: Tensor) -> tuple[int, ...]:
    return (0,) + tuple(range(2, input.dim()))


def _group(group_name: str):
    return resolve_process_group(group_name)


def _channel_view(per_channel: Tensor, input: Tensor) -> Tensor:
    """[C] -> [C, 1, ...], to broadcast against ``input``."""
    return per_channel.view((-1,) + (1,) * (input.dim() - 2))


class _LocalKernels:
    """A rank's local work, any device, layout and dtype: PyTorch ops (the default body's). A
    device's kernels override it and say which input they take (``takes``)."""

    # whether these are the differentiable composite's (``higher_order_autograd``)
    differentiable = False
    # whether they run inside a graph being compiled: the collective check asserts
    # asynchronously (``collective_tags.check``)
    traced = False

    @staticmethod
    def takes(input: Tensor) -> bool:
        return True

    @staticmethod
    def moments(input: Tensor) -> tuple[Tensor, Tensor]:
        """``(mean, M2)`` [C] float64 of a non-empty batch."""
        count = input.numel() // input.shape[1]
        var = torch.var(input.to(contract.stat_dtype(input)), _reduced_dims(input), correction=0)
        # the mean in float64: rounded to float32 it would be off by more than the spread of
        # input far from zero, and the group's variance merges the ranks' means
        mean = input.sum(_reduced_dims(input), dtype=torch.float64) / count
        return mean, var.double() * count

    @staticmethod
    def normalize(input, mean, var, weight, bias, eps):
        """``(x - mean) / sqrt(var + eps) * weight + bias`` with the group's float64 statistics."""
        dtype = contract.stat_dtype(input)
        offset = mean
        if input.dtype == torch.float32:
            # Torch's eval kernel computes x * scale + (bias - mean * scale), which cancels when
            # the mean is large against the spread: center on the mean's float32 rounding
            # first, and normalize the rest (what is left of the mean is small).
            estimate = mean.to(dtype)
            centered = input - _channel_view(estimate, input)
            offset = mean - estimate.double()
        else:
            centered = input
        weight, bias = (None if p is None else p.to(dtype) for p in (weight, bias))
        out = torch.ops.aten._native_batch_norm_legit_no_training(
            centered, weight, bias, offset.to(dtype), var.to(dtype), 0.0, eps
        )[0]
        return contract.laid_out_like(out, input)

    @staticmethod
    def grad_sums(grad_out, input, save_mean, save_var, eps):
        """``(sum(dy), sum(dy * x_hat))`` [C] of a non-empty batch."""
        _, sum_dy_xhat, sum_dy = torch.ops.aten.native_batch_norm_backward(
            grad_out, input, None, save_mean, save_var, None, None, False, eps, [False, True, True]
        )
        return sum_dy, sum_dy_xhat

    @staticmethod
    def grad_input(grad_out, input, save_mean, a, k, c):
        """``a dy - k (x - mean) + c`` with per-channel coefficients."""
        centered = input.to(contract.stat_dtype(input)) - _channel_view(save_mean, input)
        grad_input = torch.addcmul(_channel_view(c, input), centered, _channel_view(k, input), value=-1)
        grad_input = grad_input.addcmul_(grad_out, _channel_view(a, input)).to(input.dtype)
        return contract.laid_out_like(grad_input, input)

    @staticmethod
    def all_reduce(sums: Tensor, group_name: str) -> Tensor:
        """``sums`` summed over the group, in place."""
        dist.all_reduce(sums, group=_group(group_name))
        return sums


class _TritonKernels(_LocalKernels):
    """CUDA, fp32/fp16/bf16 input: the Triton kernels, the batch as one chunk."""

    @staticmethod
    def takes(input):
        return input.dtype in device_kernels.TRITON_DTYPES

    @staticmethod
    def moments(input):
        mean, m2 = device_kernels.triton_launchers().moments(input, input.shape[0])
        return mean[0], m2[0]

    @staticmethod
    def normalize(input, mean, var, weight, bias, eps):
        scale = torch.rsqrt(var + eps).float()
        scale = scale if weight is None else scale * weight.float()
        shift = None if bias is None else bias.float()
        return device_kernels.triton_launchers().normalize(input, mean[None], scale[None], shift, max(input.shape[0], 1))

    @staticmethod
    def grad_sums(grad_out, input, save_mean, save_var, eps):
        sum_dy, sum_dy_xmu = device_kernels.triton_launchers().backward_sums(
            grad_out, input, save_mean[None], input.shape[0]
        )
        return sum_dy[0], sum_dy_xmu[0] * torch.rsqrt(save_var + eps)

    @staticmethod
    def grad_input(grad_out, input, save_mean, a, k, c):
        coefficients = (t.float()[None] for t in (a, k, c))
        return device_kernels.triton_launchers().backward_input(
            grad_out, input, save_mean[None], *coefficients, max(input.shape[0], 1)
        )


class _DecomposedKernels(_LocalKernels):
    """Inductor's decomposition: the local work in primitives it fuses with the layers around
    (the normalization with the next ReLU, the gradient sums with the previous layer's
    backward), the all-reduces as functional collectives it schedules."""

    traced = True

    @staticmethod
    def moments(input):
        dtype = contract.stat_dtype(input)
        values = input.to(dtype)
        # Reduce differences from each channel's first value, not raw values: far from zero
        # (mean/std = 1e6) a float32 Welford mean would stop moving and the variance with it.
        pivot = values[(0, slice(None)) + (0,) * (input.dim() - 2)]  # [C]
        var, mean = torch.var_mean(values - _channel_view(pivot, input), _reduced_dims(input), correction=0)
        count = input.numel() // input.shape[1]
        return pivot.double() + mean.double(), var.double() * count

    @staticmethod
    def normalize(input, mean, var, weight, bias, eps):
        dtype = contract.stat_dtype(input)
        scale = torch.rsqrt(var + eps)
        scale = scale if weight is None else scale * weight.double()
        # the mean in two parts, its rounding to the statistics dtype and the rest: x minus the
        # first is exact where x is near the mean, and the rest is small
        estimate = mean.to(dtype)
        rest = (mean - estimate.double()).to(dtype)
        out = (input.to(dtype) - _channel_view(estimate, input) - _channel_view(rest, input)) \
            * _channel_view(scale.to(dtype), input)
        if bias is not None:
            out = out + _channel_view(bias.to(dtype), input)
        return out.to(input.dtype)

    @staticmethod
    def grad_sums(grad_out, input, save_mean, save_var, eps):
        dtype = contract.stat_dtype(input)
        dy = grad_out.to(dtype)
        centered = input.to(dtype) - _channel_view(save_mean, input)
        sum_dy = dy.sum(_reduced_dims(input))
        sum_dy_xmu = (dy * centered).sum(_reduced_dims(input))
        return sum_dy, sum_dy_xmu * torch.rsqrt(save_var + eps)

    @staticmethod
    def grad_input(grad_out, input, save_mean, a, k, c):
        dtype = contract.stat_dtype(input)
        centered = input.to(dtype) - _channel_view(save_mean, input)
        grad_input = grad_out.to(dtype) * _channel_view(a.to(dtype), input) \
            - centered * _channel_view(k.to(dtype), input) + _channel_view(c.to(dtype), input)
        return grad_input.to(input.dtype)

    @staticmethod
    def all_reduce(sums, group_name):
        return torch_internals.functional_all_reduce(sums, group_name)


class _DifferentiableKernels(_DecomposedKernels):
    """The op's differentiable composite (``higher_order_autograd``): the decomposition's
    primitives, the all-reduces differentiable in both modes."""

    differentiable = True

    @staticmethod
    def all_reduce(sums, group_name):
        return higher_order.GroupSum.apply(sums, group_name)


def _world(group_name: str) -> int:
    return dist.get_world_size(_group(group_name))


def _reduce_checked(local, sums: Tensor, site: int, direction: str, order, group_name: str) -> tuple[Tensor, Tensor]:
    """``(sums summed over the group, the order the next collective takes)``: one all-reduce of
    ``sums`` with this collective's tags (``collective_tags``), checked on every rank."""
    own = collective_tags.slots(site, direction, order, sums)
    reduced = local.all_reduce(torch.cat([sums, own]), group_name)
    world = _world(group_name)
    collective_tags.check(reduced[-collective_tags.SLOTS:], own, world, site, direction, group_name, local.traced)
    return reduced[: -collective_tags.SLOTS], collective_tags.next_order(reduced, world)


def _global_moments(local, input: Tensor, shift: Tensor, group_name: str, site: int, order):
    """``(mean, biased_var, count, next order)`` over the group, float64; one all-reduce of
    ``[n, n (m - K), M2 + n (m - K)^2, n m]`` and the tags, the same layout in every kernel.

    The mean comes from the raw sums, not from the shift (the running mean): inductor writes
    the new running mean into its buffer in the forward, and AOTAutograd's partitioner would
    save that buffer and recompute the mean from it in the backward, reading the new value. In
    float64 the raw sums keep the mean accurate far from zero; the shifted sums keep the
    variance."""
    channels = input.shape[1]
    count = input.numel() // channels
    if count == 0:  # a shape, known on the host: no synchronization
        # zeros that are a function of the input, so that an empty rank's graph is every rank's
        # (the same all-reduces in its derivatives)
        mean = input.sum(_reduced_dims(input), dtype=torch.float64)
        m2 = mean.clone()
    else:
        mean, m2 = local.moments(input)
    offset = mean - shift
    parts = [offset.new_full((1,), count), offset * count, m2 + offset * offset * count, mean * count]
    sums, order = _reduce_checked(local, torch.cat(parts), site, "forward", order, group_name)
    total = sums[:1]
    shifted_mean = sums[1 : 1 + channels] / total
    var = (sums[1 + channels : 1 + 2 * channels] / total - shifted_mean * shifted_mean).clamp(min=0)
    mean = sums[1 + 2 * channels :] / total
    return mean, var, total, order


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


def _refuse_one_value_alone(input: Tensor, group_name: str) -> None:
    """A group of one is torch's batch norm, which refuses one value per channel (with peers, a
    rank's single value is a legal share of the group's batch)."""
    if input.dim() >= 2 and input.numel() == input.shape[1] and dist.get_world_size(_group(group_name)) == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {input.size()}")


def _check_args(input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps, group_name):
    """The op's checks: a group of one's one-value refusal, then the contract, sizes checked on
    an empty share too (a rank must refuse what its peers refuse, not wait for them)."""
    _refuse_one_value_alone(input, group_name)
    contract.check_args(input, weight, bias, running_mean, running_var, momentum, num_batches_tracked, eps,
                        sizes_when_empty=True)


def _sync_batch_norm(kernels, input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps,
                     group_name, order=None, site=0):
    if not kernels.differentiable:
        higher_order.refuse_tangents("sync_batch_norm", input, weight, bias)
    _check_args(input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps, group_name)
    local = device_kernels.local_kernels(kernels, input)
    channels = input.shape[1]
    shift = (
        running_mean.detach().double()
        if running_mean is not None
        else input.new_zeros(channels, dtype=torch.float64)
    )
    mean, var, total, order = _global_moments(local, input, shift, group_name, site, order)
    state = _new_state(running_mean, running_var, num_batches_tracked, mean, var, total, momentum)
    out = local.normalize(input, mean, var, weight, bias, eps)
    dtype = contract.stat_dtype(input)
    return (out, *state, mean.to(dtype), var.to(dtype), total, order)


def _default_forward(
    input: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    num_batches_tracked: Tensor | None,
    momentum: float | None,
    eps: float,
    group_name: str,
    order: Tensor | None = None,
    site: int = 0,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Training-mode batch norm with statistics over the process group named ``group_name``.

    Returns ``(out, new_running_mean, new_running_var, new_num_batches_tracked, save_mean,
    save_var, count, order)``: the state outputs are empty when the matching input is None;
    ``save_mean`` and ``save_var`` (biased) are the group's statistics [C], ``count`` [1] the
    number of values per channel over the group, all three for the backward. ``order`` [1]
    float64 is the previous sync collective's ``order`` output (None for the first): passing it
    on chains the collectives, so that no compiler can reorder them (and its gradient chains
    the backward's); ``site`` (``collective_tags.site_tag``) names the call in the mismatch
    error.
    """
    return _sync_batch_norm(
        _LocalKernels, input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps, group_name,
        order, site,
    )


sync_batch_norm = device_kernels.custom_op("sync_batch_norm", _default_forward)


@sync_batch_norm.register_fake
def _(input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps, group_name, order=None,
      site=0):
    _check_args(input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps, group_name)
    stats = input.new_empty(input.shape[1], dtype=contract.stat_dtype(input))
    state = contract.fake_state(input, running_mean, running_var, num_batches_tracked, empty_dtype=torch.float64)
    count = input.new_empty(1, dtype=torch.float64)
    return (torch.empty_like(input), *state, stats, torch.empty_like(stats), count, torch.empty_like(count))


def _check_backward_args(grad_out, input, weight, save_mean, save_var, count) -> None:
    channels = (input.shape[1],) if input.dim() >= 2 else ()
    saved = {"save_mean": (save_mean, channels), "save_var": (save_var, channels), "count": (count, (1,))}
    contract.check_backward_args(grad_out, input, weight, saved)


def _sync_batch_norm_backward(kernels, grad_out, input, weight, save_mean, save_var, count, eps, group_name,
                              order=None, site=0):
    _check_backward_args(grad_out, input, weight, save_mean, save_var, count)
    local = device_kernels.local_kernels(kernels, input)
    if input.numel() == 0:  # torch's kernel divides by the batch size
        # zeros that are a function of grad_out: a compiler must not take them (and their
        # all-reduce) for constants of the forward on an empty rank alone
        sum_dy = grad_out.sum(_reduced_dims(grad_out), dtype=save_mean.dtype)
        sum_dy_xhat = sum_dy.clone()
    else:
        sum_dy, sum_dy_xhat = local.grad_sums(grad_out, input, save_mean, save_var, eps)
    sums = torch.cat([sum_dy, sum_dy_xhat]).to(save_mean.dtype)
    sums, order = _reduce_checked(local, sums, site, "backward", order, group_name)
    sums = sums.to(save_mean.dtype).view(2, -1)
    # dx = a (dy - mean(dy) - x_hat mean(dy x_hat)), x_hat = (x - mean) invstd, means over
    # the group, written as dx = a dy - k (x - mean) + c with per-channel a, k, c.
    invstd = torch.rsqrt(save_var + eps)
    a = invstd if weight is None else invstd * weight.to(invstd.dtype)
    mean_dy, mean_dy_xhat = sums / count.to(sums.dtype)
    grad_input = local.grad_input(grad_out, input, save_mean, a, a * invstd * mean_dy_xhat, -a * mean_dy)
    if weight is None:
        return grad_input, input.new_empty(0), input.new_empty(0), order
    return grad_input, sum_dy_xhat.to(weight.dtype), sum_dy.to(weight.dtype), order


def _default_backward(
    grad_out: Tensor,
    input: Tensor,
    weight: Tensor | None,
    save_mean: Tensor,
    save_var: Tensor,
    count: Tensor,
    eps: float,
    group_name: str,
    order: Tensor | None = None,
    site: int = 0,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of sync_batch_norm's output: ``(grad_input, grad_weight, grad_bias, order)``.

    ``grad_weight`` and ``grad_bias`` are this rank's share (data-parallel training sums or
    averages them over ranks); empty when ``weight`` is None. One all-reduce of 2 C values and
    the tags. ``order``: the gradient of the forward's ``order`` output (the position the next
    site's backward passed on), the returned one the gradient of its ``order`` input.
    """
    return _sync_batch_norm_backward(
        _LocalKernels, grad_out, input, weight, save_mean, save_var, count, eps, group_name, order, site
    )


sync_batch_norm_backward = device_kernels.custom_op("sync_batch_norm_backward", _default_backward)


@sync_batch_norm_backward.register_fake
def _(grad_out, input, weight, save_mean, save_var, count, eps, group_name, order=None, site=0):
    _check_backward_args(grad_out, input, weight, save_mean, save_var, count)
    return (*contract.fake_input_grads(input, weight), count.new_empty(1))


contract.register_autograd(
    sync_batch_norm, torch.ops.bnfx.sync_batch_norm_backward, ("eps", "group_name"), order=("order", "site")
)


def sync_batch_norm_decomposition(input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps,
                                  group_name, order=None, site=0):
    return _sync_batch_norm(_DecomposedKernels, input, weight, bias, running_mean, running_var, num_batches_tracked,
                            momentum, eps, group_name, order, site)


def sync_batch_norm_backward_decomposition(grad_out, input, weight, save_mean, save_var, count, eps, group_name,
                                           order=None, site=0):
    return _sync_batch_norm_backward(_DecomposedKernels, grad_out, input, weight, save_mean, save_var, count, eps,
                                     group_name, order, site)


# Without functional collectives (torch_internals says so) inductor calls the op as it is.
DECOMPOSITIONS = {
    torch.ops.bnfx.sync_batch_norm.default: sync_batch_norm_decomposition,
    torch.ops.bnfx.sync_batch_norm_backward.default: sync_batch_norm_backward_decomposition,
} if torch_internals.has_functional_collectives else {}

# Double backward and forward-mode AD: the decomposition with differentiable all-reduces.
def sync_batch_norm_composite(input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps,
                              group_name, order=None, site=0):
    return _sync_batch_norm(_DifferentiableKernels, input, weight, bias, running_mean, running_var,
                            num_batches_tracked, momentum, eps, group_name, order, site)


def _normalized(input, weight, eps, group_name):
    return sync_batch_norm_composite(input, weight, None, None, None, None, 0.0, eps, group_name)[0]


higher_order.define_composite(sync_batch_norm, sync_batch_norm_composite)
higher_order.register_double_backward(sync_batch_norm_backward, _normalized, ("eps", "group_name"))

if device_kernels.triton_launchers() is not None:
    device_kernels.register_local_kernels(
        "cuda", _TritonKernels,
        (sync_batch_norm, _sync_batch_norm), (sync_batch_norm_backward, _sync_batch_norm_backward),
    )
