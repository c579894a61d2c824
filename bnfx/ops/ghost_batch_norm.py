"""torch.ops.bnfx.ghost_batch_norm: batch norm with statistics per virtual sub-batch.

The batch is split as ``input.chunk(ceil(B / ghost_batch_size), 0)`` splits it (MosaicML
Composer's GhostBatchNorm): ``B // chunk_size`` chunks of ``chunk_size`` samples, then one
shorter chunk of ``B % chunk_size`` when that is not zero. Each chunk is normalized with
its own mean and biased variance. The running statistics end where Composer's sequential
per-chunk updates end (momentum / nchunks per chunk, unbiased variance), computed in closed
form; with ``momentum=None`` every chunk counts as one batch of the cumulative average.

The op's layers, in dispatch order (none with a Python loop over chunks):

- autograd: on CPU the C++ autograd kernel (``csrc/ghost_batch_norm_cpu.cpp``, AutogradCPU),
  elsewhere ``batch_norm_contract.register_autograd``; both call
  ``bnfx::ghost_batch_norm_backward``, which has the same layers below autograd;
- fake tensors (``register_fake``): the output shapes, and the argument checks;
- CPU: the C++ kernels (``csrc/ghost_batch_norm_cpu.cpp``, registered from C++), which take
  every CPU call and reduce and normalize each (chunk, channel) while it is in cache;
- CUDA, fp32/fp16/bf16 input: Triton (``triton/``), one launch for all nchunks x C
  statistics (``_TritonKernels``, through ``device_kernels.register_local_kernels``);
- the default body, any other device, layout and dtype: PyTorch ops on views of the input,
  ``[nchunks, chunk_size, C, ...]`` for the equal chunks and ``[1, last, C, ...]`` for a
  shorter last one, with no copy of the input and one full-size allocation per direction.

Inductor gets decompositions into primitives instead (``DECOMPOSITIONS``), which it fuses.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from bnfx import torch_internals
from bnfx.ops import batch_norm_contract as contract
from bnfx.ops import device_kernels
from bnfx.ops import higher_order_autograd as higher_order


def ghost_chunk_layout(batch: int, ghost_batch_size: int) -> tuple[int, int, int]:
    """``(chunk_size, equal_chunks, last_size)`` of ``batch`` samples split as Composer does.

    ``equal_chunks`` chunks of ``chunk_size`` samples come first; ``last_size`` (possibly 0)
    samples form one more chunk. The number of chunks is always ``ceil(batch / ghost_batch_size)``.
    """
    nchunks = ghost_chunk_count(batch, ghost_batch_size)
    chunk_size = (batch + nchunks - 1) // nchunks
    return chunk_size, batch // chunk_size, batch % chunk_size


def ghost_chunk_count(batch: int, ghost_batch_size: int) -> int:
    return (batch + ghost_batch_size - 1) // ghost_batch_size


def _check_args(input: Tensor, weight, bias, running_mean, running_var, num_batches_tracked, ghost_batch_size: int,
                momentum, eps) -> bool:
    """The op's checks (``batch_norm_contract.check_args`` and the ghost batch's size); returns
    whether ``input`` is empty."""
    _check_ghost_batch_size(ghost_batch_size)
    batch = input.shape[0] if input.dim() else 0
    if input.dim() >= 2 and batch != 0:
        # torch's first check in training: more than one value per channel, here per ghost batch.
        # The last chunk is the smallest. Under dynamic shapes this is one condition on the
        # symbolic batch size (true across the range), not a branch on B % chunk_size.
        nchunks = ghost_chunk_count(batch, ghost_batch_size)
        chunk_size = ghost_chunk_layout(batch, ghost_batch_size)[0]
        last = batch - (nchunks - 1) * chunk_size
        torch._check_value(last * math.prod(input.shape[2:]) != 1, lambda: _one_value_message(input, ghost_batch_size))
    return contract.check_args(input, weight, bias, running_mean, running_var, momentum, num_batches_tracked, eps)


def _check_ghost_batch_size(ghost_batch_size: int) -> None:
    if ghost_batch_size < 1:
        raise ValueError(f"ghost_batch_size must be a positive int, got {ghost_batch_size}")


def _one_value_message(input: Tensor, ghost_batch_size: int) -> str:
    batch = torch_internals.size_hint(input.shape[0])
    if ghost_chunk_count(batch, ghost_batch_size) == 1:  # the whole batch: torch's words
        return f"Expected more than 1 value per channel when training, got input size {input.size()}"
    return (
        f"ghost batch norm needs more than 1 value per channel in every ghost batch, got a "
        f"ghost batch of 1 sample of shape {tuple(torch_internals.size_hint(n) for n in input.shape[1:])} "
        f"(batch size {batch}, ghost_batch_size={ghost_batch_size}, split as "
        f"input.chunk(ceil(batch / ghost_batch_size)) splits it); choose a batch size or "
        f"ghost_batch_size whose last ghost batch has 2 samples or more"
    )


def _empty_outputs(input, running_mean, running_var, num_batches_tracked, ghost_batch_size):
    """The op's outputs for an empty input: each chunk counts as torch counts an empty batch
    (an empty batch is one chunk); saved statistics of the fake kernel's shape."""
    nchunks = ghost_chunk_count(input.shape[0], ghost_batch_size)
    stats = input.new_zeros((nchunks, input.shape[1]), dtype=contract.stat_dtype(input))
    return contract.empty_outputs(
        input, running_mean, running_var, num_batches_tracked, torch.sym_max(nchunks, 1), (stats, stats.clone())
    )


def _segments(t: Tensor, ghost_batch_size: int) -> list[Tensor]:
    """Views ``[chunks, size, C, ...]`` of ``t``: the equal chunks, then the shorter last one."""
    chunk_size, equal, last = ghost_chunk_layout(t.shape[0], ghost_batch_size)
    split = equal * chunk_size
    segments = [t[:split].unflatten(0, (equal, chunk_size))]
    if last:
        segments.append(t[split:].unsqueeze(0))
    return segments


def _values_per_channel(segment: Tensor) -> int:
    return segment[0, :, 0].numel()


def _broadcast(per_chunk: Tensor, segment: Tensor) -> Tensor:
    """[chunks, C] -> [chunks, 1, C, 1, ...], to broadcast against ``segment``."""
    return per_chunk.view((per_chunk.shape[0], 1, per_chunk.shape[1]) + (1,) * (segment.dim() - 3))


def _chunk_sums(segment: Tensor, dtype: torch.dtype) -> Tensor:
    """[chunks, C] sums over each chunk's samples and spatial positions."""
    return segment.sum((1,) + tuple(range(3, segment.dim())), dtype=dtype)


def _chunk_squares(segment: Tensor, dtype: torch.dtype) -> Tensor:
    """[chunks, C] sums of squares, with no temporary of the segment's size for spatial input."""
    if segment.dim() == 3:  # [chunks, size, C]: small, a temporary is cheap
        values = segment.to(dtype)
        return (values * values).sum(1)
    spatial = tuple(range(3, segment.dim()))
    return torch.linalg.vector_norm(segment, dim=spatial, dtype=dtype).square().sum(1)


def _cat(per_segment: list[Tensor]) -> Tensor:
    return per_segment[0] if len(per_segment) == 1 else torch.cat(per_segment)


def _new_state(input, running_mean, running_var, num_batches_tracked, save_mean, unbiased_vars, momentum):
    """``(new_running_mean, new_running_var, new_num_batches_tracked)``, empty where None."""
    if running_mean is None:
        new_mean, new_var = input.new_empty(0), input.new_empty(0)
    else:
        new_mean, new_var = _new_running_stats(
            running_mean, running_var, num_batches_tracked, save_mean, unbiased_vars, momentum
        )
    new_tracked = input.new_empty(0) if num_batches_tracked is None else num_batches_tracked + save_mean.shape[0]
    return new_mean, new_var, new_tracked


def _new_running_stats(
    running_mean: Tensor,
    running_var: Tensor,
    num_batches_tracked: Tensor | None,
    means: Tensor,  # [nchunks, C]
    unbiased_vars: Tensor,  # [nchunks, C]
    momentum: float | None,
) -> tuple[Tensor, Tensor]:
    means, unbiased_vars = means.to(running_mean.dtype), unbiased_vars.to(running_var.dtype)
    index = torch.arange(means.shape[0], dtype=means.dtype, device=means.device)  # [nchunks] 0, 1, ...
    nchunks = means.shape[0]
    if not isinstance(nchunks, int):
        # a symbolic batch size: the chunk count as a tensor, so that it makes no Python float
        # (which compilers would specialize on)
        nchunks = index[-1] + 1
    if momentum is None:
        # Each chunk is one batch of the cumulative average, after the batches seen before.
        seen = num_batches_tracked.to(running_mean.dtype)
        total = seen + nchunks
        return (running_mean * seen + means.sum(0)) / total, (running_var * seen + unbiased_vars.sum(0)) / total
    # Composer's sequential updates r <- (1 - f) r + f x_j with f = momentum / nchunks,
    # unrolled: chunk j is weighted f (1 - f)^(nchunks - 1 - j).
    f = momentum / nchunks
    weights = (f * (1.0 - f) ** (nchunks - 1 - index)).unsqueeze(1)  # [nchunks, 1]
    keep = (1.0 - f) ** nchunks
    # sums, not a matmul: TF32 matmuls would round the statistics
    return running_mean * keep + (weights * means).sum(0), running_var * keep + (weights * unbiased_vars).sum(0)


def _chunk_counts(input: Tensor, ghost_batch_size: int) -> Tensor:
    """[nchunks, 1] float64 values per channel of each chunk, built on the device (no copy)."""
    chunk_size, equal, last = ghost_chunk_layout(input.shape[0], ghost_batch_size)
    per_sample = input[0, 0].numel()
    counts = input.new_full((equal + (last > 0), 1), chunk_size * per_sample, dtype=torch.float64)
    if last:
        counts[-1] = last * per_sample
    return counts


def _input_and_affine_grads(input, weight, grad_input, sum_dy, sum_dy_xmu, save_invstd):
    """The backward's outputs from the per-chunk sums ``sum(dy)`` and ``sum(dy * (x - mean))``."""
    if weight is None:
        return grad_input, input.new_empty(0), input.new_empty(0)
    grad_weight = (sum_dy_xmu * save_invstd).sum(0)
    return grad_input, grad_weight.to(weight.dtype), sum_dy.sum(0).to(weight.dtype)


class _LocalKernels:
    """The op's work on one device, any device, layout and dtype: PyTorch ops on views (the
    default body's). A device's kernels override it and say which input they take (``takes``)."""

    @staticmethod
    def takes(input: Tensor) -> bool:
        return True

    @staticmethod
    def forward(input, weight, bias, ghost_batch_size, eps):
        """``(out, save_mean, save_invstd, unbiased_var)``, statistics [nchunks, C]."""
        dtype = contract.stat_dtype(input)
        out = torch.empty_like(input)
        means, invstds, unbiased_vars = [], [], []
        for x, result in zip(_segments(input, ghost_batch_size), _segments(out, ghost_batch_size)):  # 1 or 2 views
            size = _values_per_channel(x)
            # y: the centred values, then the output, in the statistics dtype; reduced-precision
            # input gets a float32 scratch, so that nothing is rounded to its dtype before the end
            y = result if input.dtype == dtype else torch.empty_like(x, dtype=dtype)
            # Center on an estimate, then take the statistics of the centered values
            estimate = _chunk_sums(x, dtype).div_(size)  # [chunks, C]
            torch.sub(x, _broadcast(estimate, x), out=y)  # y holds x - estimate for now
            offset = _chunk_sums(y, dtype).div_(size)  # [chunks, C], the mean of x - estimate
            biased_var = (_chunk_squares(y, dtype).div_(size) - offset.square()).clamp_(min=0)
            invstd = torch.rsqrt(biased_var + eps)
            scale = invstd if weight is None else invstd * weight
            # out = (y - offset) scale + bias, with no cancellation: y and offset are small
            shift = -offset * scale
            if bias is not None:
                shift = shift + bias.to(dtype)
            torch.addcmul(_broadcast(shift, x), y, _broadcast(scale, x), out=y)
            if y is not result:
                result.copy_(y)  # rounded once
            means.append(estimate + offset)
            invstds.append(invstd)
            unbiased_vars.append(biased_var.mul_(size / max(size - 1, 1)))
        return out, _cat(means), _cat(invstds), _cat(unbiased_vars)

    @staticmethod
    def backward(grad_out, input, weight, save_mean, save_invstd, ghost_batch_size):
        """``(grad_input, sum_dy, sum_dy_xmu)``, sums [nchunks, C]."""
        dtype = contract.stat_dtype(input)
        grad_input = torch.empty_like(input)
        start, sums_dy, sums_dy_xmu = 0, [], []
        segments = zip(*(_segments(t, ghost_batch_size) for t in (grad_out, input, grad_input)))
        for dy, x, result in segments:  # 1 or 2 views
            chunks, size = x.shape[0], _values_per_channel(x)
            mean, invstd = save_mean[start : start + chunks], save_invstd[start : start + chunks]
            start += chunks
            # dx in the statistics dtype (a float32 scratch for reduced-precision input), rounded once
            dx = result if input.dtype == dtype and grad_out.dtype == dtype else torch.empty_like(x, dtype=dtype)
            sum_dy = _chunk_sums(dy, dtype)  # [chunks, C]
            torch.sub(x, _broadcast(mean, x), out=dx).mul_(dy)  # scratch: dy * (x - mean)
            sum_dy_xmu = _chunk_sums(dx, dtype)
            # dx = a (dy - mean(dy) - (x - mean) invstd^2 mean(dy (x - mean))), a = weight * invstd,
            # as dx = a dy + b x + c with per-(chunk, channel) coefficients.
            a = invstd if weight is None else invstd * weight
            b = sum_dy_xmu * invstd.square().mul_(a).mul_(-1.0 / size)
            c = torch.addcmul(b * mean, a, sum_dy, value=1.0 / size).neg_()
            torch.addcmul(_broadcast(c, x), x, _broadcast(b, x), out=dx)
            dx.addcmul_(dy, _broadcast(a, x))
            if dx is not result:
                result.copy_(dx)
            sums_dy.append(sum_dy)
            sums_dy_xmu.append(sum_dy_xmu)
        return grad_input, _cat(sums_dy), _cat(sums_dy_xmu)


class _TritonKernels(_LocalKernels):
    """CUDA, fp32/fp16/bf16 input: Triton statistics, normalization and gradients."""

    @staticmethod
    def takes(input: Tensor) -> bool:
        return input.dtype in device_kernels.TRITON_DTYPES

    @staticmethod
    def forward(input, weight, bias, ghost_batch_size, eps):
        triton = device_kernels.triton_launchers()
        chunk_size = ghost_chunk_layout(input.shape[0], ghost_batch_size)[0]
        mean, m2 = triton.moments(input, chunk_size)  # [nchunks, C] float64
        counts = _chunk_counts(input, ghost_batch_size)
        invstd = torch.rsqrt(m2 / counts + eps).float()
        scale = invstd if weight is None else invstd * weight.float()
        out = triton.normalize(input, mean, scale, None if bias is None else bias.float(), chunk_size)
        return out, mean.float(), invstd, (m2 / (counts - 1)).float()

    @staticmethod
    def backward(grad_out, input, weight, save_mean, save_invstd, ghost_batch_size):
        triton = device_kernels.triton_launchers()
        chunk_size = ghost_chunk_layout(input.shape[0], ghost_batch_size)[0]
        sum_dy, sum_dy_xmu = triton.backward_sums(grad_out, input, save_mean, chunk_size)  # [nchunks, C]
        counts = _chunk_counts(input, ghost_batch_size).float()
        # dx = a (dy - mean(dy) - (x - mean) invstd^2 mean(dy (x - mean))) = a dy - k (x - mean) + c
        a = save_invstd if weight is None else save_invstd * weight.float()
        k = a * save_invstd.square() * sum_dy_xmu / counts
        c = -a * sum_dy / counts
        return triton.backward_input(grad_out, input, save_mean, a, k, c, chunk_size), sum_dy, sum_dy_xmu



def _ghost_batch_norm(kernels, input, weight, bias, running_mean, running_var, num_batches_tracked, ghost_batch_size,
                      momentum, eps):
    """The op's body around a device's local work (``kernels``: ``_LocalKernels`` or a subclass)."""
    higher_order.refuse_tangents("ghost_batch_norm", input, weight, bias)
    if _check_args(input, weight, bias, running_mean, running_var, num_batches_tracked, ghost_batch_size, momentum, eps):
        return _empty_outputs(input, running_mean, running_var, num_batches_tracked, ghost_batch_size)
    local = device_kernels.local_kernels(kernels, input)
    out, save_mean, save_invstd, unbiased = local.forward(input, weight, bias, ghost_batch_size, eps)
    state = _new_state(input, running_mean, running_var, num_batches_tracked, save_mean, unbiased, momentum)
    return (out, *state, save_mean, save_invstd)


def _default_forward(
    input: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    num_batches_tracked: Tensor | None,
    ghost_batch_size: int,
    momentum: float | None,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Training-mode ghost batch norm.

    Returns ``(out, new_running_mean, new_running_var, new_num_batches_tracked, save_mean,
    save_invstd)``; the state outputs are empty when the matching input is None, and
    ``save_mean``/``save_invstd`` are ``[nchunks, C]`` for the backward.
    """
    return _ghost_batch_norm(
        _LocalKernels, input, weight, bias, running_mean, running_var, num_batches_tracked, ghost_batch_size,
        momentum, eps,
    )


ghost_batch_norm = device_kernels.custom_op("ghost_batch_norm", _default_forward)


@ghost_batch_norm.register_fake
def _(input, weight, bias, running_mean, running_var, num_batches_tracked, ghost_batch_size, momentum, eps):
    _check_args(input, weight, bias, running_mean, running_var, num_batches_tracked, ghost_batch_size, momentum, eps)
    nchunks = ghost_chunk_count(input.shape[0], ghost_batch_size)
    stats = input.new_empty((nchunks, input.shape[1]), dtype=contract.stat_dtype(input))
    state = contract.fake_state(input, running_mean, running_var, num_batches_tracked)
    return (torch.empty_like(input), *state, stats, torch.empty_like(stats))


def _check_backward_args(grad_out, input, weight, save_mean, save_invstd, ghost_batch_size) -> None:
    _check_ghost_batch_size(ghost_batch_size)
    shape = (ghost_chunk_count(input.shape[0], ghost_batch_size), input.shape[1]) if input.dim() >= 2 else ()
    contract.check_backward_args(grad_out, input, weight, {"save_mean": (save_mean, shape), "save_invstd": (save_invstd, shape)})


def _ghost_batch_norm_backward(kernels, grad_out, input, weight, save_mean, save_invstd, ghost_batch_size, eps):
    _check_backward_args(grad_out, input, weight, save_mean, save_invstd, ghost_batch_size)
    if input.numel() == 0:
        return contract.empty_input_grads(input, weight)
    local = device_kernels.local_kernels(kernels, input)
    grad_input, sum_dy, sum_dy_xmu = local.backward(grad_out, input, weight, save_mean, save_invstd, ghost_batch_size)
    return _input_and_affine_grads(input, weight, grad_input, sum_dy, sum_dy_xmu, save_invstd)


def _default_backward(
    grad_out: Tensor,
    input: Tensor,
    weight: Tensor | None,
    save_mean: Tensor,
    save_invstd: Tensor,
    ghost_batch_size: int,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of ghost_batch_norm's output: ``(grad_input, grad_weight, grad_bias)``.

    ``grad_weight`` and ``grad_bias`` are empty when ``weight`` is None.
    """
    return _ghost_batch_norm_backward(
        _LocalKernels, grad_out, input, weight, save_mean, save_invstd, ghost_batch_size, eps
    )


ghost_batch_norm_backward = device_kernels.custom_op("ghost_batch_norm_backward", _default_backward)


@ghost_batch_norm_backward.register_fake
def _(grad_out, input, weight, save_mean, save_invstd, ghost_batch_size, eps):
    _check_backward_args(grad_out, input, weight, save_mean, save_invstd, ghost_batch_size)
    return contract.fake_input_grads(input, weight)


contract.register_autograd(ghost_batch_norm, torch.ops.bnfx.ghost_batch_norm_backward, ("ghost_batch_size", "eps"))
if device_kernels.triton_launchers() is not None:
    device_kernels.register_local_kernels(
        "cuda", _TritonKernels,
        (ghost_batch_norm, _ghost_batch_norm), (ghost_batch_norm_backward, _ghost_batch_norm_backward),
    )


# Decompositions into primitive ops, for compilers that fuse them (inductor), in two forms:
#
# - a shape known when compiling (the usual case): the default body's segments (views
#   [chunks, size, C, ...]), one Welford reduction per segment of values shifted by each
#   chunk's first value, everything else on the same views. Inductor compiles it into about
#   as many kernels as torch's own batch norm (README, "Under inductor"). It is not the
#   default body itself, which writes in place.
# - a symbolic shape (dynamic=True): chunks indexed instead of sliced, so that nothing depends
#   on the batch size's value and one graph serves every size: one Welford reduction per
#   (sample, channel), merged per chunk with Chan's formula.


def _segment_forward(input, weight, bias, ghost_batch_size, eps):
    """``(out, save_mean, save_invstd, unbiased_var)`` from the segments of ``input``."""
    dtype = contract.stat_dtype(input)
    outs, means, invstds, unbiased_vars = [], [], [], []
    for x in _segments(input.to(dtype), ghost_batch_size):  # 1 or 2 views
        # Reduce differences from each chunk's first value, not raw values: far from zero
        # (mean/std = 1e6) a float32 Welford mean would stop moving and the variance with it.
        pivot = x[(slice(None), slice(0, 1), slice(None)) + (slice(0, 1),) * (x.dim() - 3)].detach()
        var, offset = torch.var_mean(x - pivot, dim=_chunk_dims(x), correction=0, keepdim=True)
        invstd = torch.rsqrt(var + eps)
        scale = invstd if weight is None else invstd * _channels(weight, x)
        out = (x - pivot - offset) * scale  # x - pivot is exact near the mean, and the offset small
        if bias is not None:
            out = out + _channels(bias, x)
        outs.append(out.flatten(0, 1))
        size = _values_per_channel(x)
        means.append(_per_chunk_view(pivot + offset))
        invstds.append(_per_chunk_view(invstd))
        unbiased_vars.append(_per_chunk_view(var) * (size / max(size - 1, 1)))
    return _joined(outs, input), _cat(means), _cat(invstds), _cat(unbiased_vars)


def _segment_backward(grad_out, input, weight, save_mean, save_invstd, ghost_batch_size):
    """``(grad_input, sum_dy, sum_dy_xmu)`` from the segments of ``grad_out`` and ``input``."""
    dtype = contract.stat_dtype(input)
    start, grads, sums_dy, sums_dy_xmu = 0, [], [], []
    for dy, x in zip(_segments(grad_out.to(dtype), ghost_batch_size), _segments(input.to(dtype), ghost_batch_size)):
        chunks, size = x.shape[0], _values_per_channel(x)
        mean, invstd = save_mean[start : start + chunks], save_invstd[start : start + chunks]
        start += chunks
        centered = x - _broadcast(mean, x)
        sum_dy = dy.sum(_chunk_dims(x))  # [chunks, C]
        sum_dy_xmu = (dy * centered).sum(_chunk_dims(x))
        # dx = a (dy - mean(dy) - (x - mean) invstd^2 mean(dy (x - mean))), a = weight * invstd
        a = invstd if weight is None else invstd * weight
        k = sum_dy_xmu / size * invstd * invstd
        grad = _broadcast(a, x) * (dy - _broadcast(sum_dy / size, x) - centered * _broadcast(k, x))
        grads.append(grad.flatten(0, 1))
        sums_dy.append(sum_dy)
        sums_dy_xmu.append(sum_dy_xmu)
    return _joined(grads, input), _cat(sums_dy), _cat(sums_dy_xmu)


def _joined(per_segment: list[Tensor], like: Tensor) -> Tensor:
    """The segments' results as one tensor of ``like``'s dtype and memory format (a cat with a
    one-sample segment, whose strides say no format, would fall back to contiguous)."""
    joined = _cat(per_segment).to(like.dtype)
    if len(per_segment) == 1 or like.is_contiguous():
        return joined
    for memory_format in (torch.channels_last, torch.channels_last_3d):
        if like.is_contiguous(memory_format=memory_format):
            return joined.contiguous(memory_format=memory_format)
    return joined


def _chunk_dims(segment: Tensor) -> tuple[int, ...]:
    """A segment's dimensions reduced per (chunk, channel): the samples and the spatial ones."""
    return (1,) + tuple(range(3, segment.dim()))


def _channels(per_channel: Tensor, segment: Tensor) -> Tensor:
    """[C] -> [1, 1, C, 1, ...], to broadcast against ``segment``."""
    return per_channel.view((1, 1, -1) + (1,) * (segment.dim() - 3))


def _per_chunk_view(kept: Tensor) -> Tensor:
    """[chunks, 1, C, 1, ...] (a keepdim reduction over a segment) -> [chunks, C]."""
    return kept.view(kept.shape[0], kept.shape[2])


def _chunk_index(input: Tensor, ghost_batch_size: int) -> tuple[Tensor, tuple[int, int]]:
    """``([B] chunk of each sample, (nchunks, chunk_size))``."""
    batch = input.shape[0]
    chunk_size = ghost_chunk_layout(batch, ghost_batch_size)[0]
    chunk_of = torch.arange(batch, device=input.device) // chunk_size
    return chunk_of, (ghost_chunk_count(batch, ghost_batch_size), chunk_size)


def _over_space(t: Tensor) -> Tensor:
    """[B, C, ...] -> [B, C] sums over the spatial dimensions."""
    return t.sum(tuple(range(2, t.dim()))) if t.dim() > 2 else t


def _chunk_rows(per_sample: Tensor, layout: tuple[int, int]) -> Tensor:
    """[B, C] -> [nchunks, chunk_size, C]: zero rows pad the batch to nchunks x chunk_size
    (the last chunk may be short)."""
    nchunks, chunk_size = layout
    padded = torch.nn.functional.pad(per_sample, (0, 0, 0, nchunks * chunk_size - per_sample.shape[0]))
    return padded.view(nchunks, chunk_size, per_sample.shape[1])


def _per_chunk(per_sample: Tensor, layout: tuple[int, int]) -> Tensor:
    """[B, C] -> [nchunks, C] sums over each chunk's samples (the padding rows are zeros)."""
    return _chunk_rows(per_sample, layout).sum(1)


def _to_samples(per_chunk: Tensor, chunk_of: Tensor, like: Tensor) -> Tensor:
    """[nchunks, C] -> [B, C, 1, ...]: each sample's chunk value, broadcast against ``like``."""
    per_sample = per_chunk[chunk_of]
    return per_sample.view(per_sample.shape + (1,) * (like.dim() - 2))


def _chunk_sizes(input: Tensor, layout: tuple[int, int], dtype: torch.dtype) -> Tensor:
    """[nchunks, 1] values per channel of each chunk."""
    samples = _per_chunk(input.new_ones((input.shape[0], 1), dtype=dtype), layout)
    return samples * input[0, 0].numel()


def _indexed_forward(input, weight, bias, ghost_batch_size, eps):
    """``(out, save_mean, save_invstd, unbiased_var)`` with chunks indexed: any batch size."""
    dtype = contract.stat_dtype(input)
    chunk_of, layout = _chunk_index(input, ghost_batch_size)
    values = input.to(dtype)
    per_sample = input[0, 0].numel()
    # Reduce small differences, not raw values: each sample relative to one of its values (its
    # first position), then each chunk relative to one of its samples' (its first sample's).
    # The output is (x - shift) - offset, with no mean rounded to the input dtype in between.
    if input.dim() > 2:
        sample_shift = values[(slice(None), slice(None)) + (0,) * (input.dim() - 2)]  # [B, C]
        relative = values - sample_shift.view(sample_shift.shape + (1,) * (input.dim() - 2))
        sample_var, sample_mean = torch.var_mean(relative, dim=tuple(range(2, input.dim())), correction=0)
    else:
        sample_shift, sample_var, sample_mean = values, torch.zeros_like(values), torch.zeros_like(values)
    shift = _chunk_rows(sample_shift, layout)[:, 0]  # [nchunks, C], each chunk's first sample
    sample_mean = (sample_shift - shift[chunk_of]) + sample_mean  # [B, C], relative to the chunk's shift
    sizes = _chunk_sizes(input, layout, dtype)
    offset = _per_chunk(sample_mean, layout) * per_sample / sizes  # [nchunks, C], the mean of x - shift
    deviation = sample_mean - offset[chunk_of]
    m2 = _per_chunk(sample_var + deviation * deviation, layout) * per_sample
    invstd = torch.rsqrt(m2 / sizes + eps)
    scale = invstd if weight is None else invstd * weight
    shifted = values - _to_samples(shift, chunk_of, input)
    out = (shifted - _to_samples(offset, chunk_of, input)) * _to_samples(scale, chunk_of, input)
    if bias is not None:
        out = out + bias.view((-1,) + (1,) * (input.dim() - 2))
    return out.to(input.dtype), shift + offset, invstd, m2 / (sizes - 1).clamp(min=1)


def _indexed_backward(grad_out, input, weight, save_mean, save_invstd, ghost_batch_size):
    """``(grad_input, sum_dy, sum_dy_xmu)`` with chunks indexed: any batch size."""
    dtype = contract.stat_dtype(input)
    chunk_of, layout = _chunk_index(input, ghost_batch_size)
    dy = grad_out.to(dtype)
    centered = input.to(dtype) - _to_samples(save_mean, chunk_of, input)
    sum_dy = _per_chunk(_over_space(dy), layout)  # [nchunks, C]
    sum_dy_xmu = _per_chunk(_over_space(dy * centered), layout)
    sizes = _chunk_sizes(input, layout, dtype)
    scale = save_invstd if weight is None else save_invstd * weight
    k = sum_dy_xmu / sizes * save_invstd * save_invstd
    grad_input = _to_samples(scale, chunk_of, input) * (
        dy - _to_samples(sum_dy / sizes, chunk_of, input) - centered * _to_samples(k, chunk_of, input)
    )
    return grad_input.to(input.dtype), sum_dy, sum_dy_xmu


def _shape_known(input: Tensor) -> bool:
    return all(isinstance(size, int) for size in input.shape)


def ghost_batch_norm_decomposition(
    input, weight, bias, running_mean, running_var, num_batches_tracked, ghost_batch_size, momentum, eps
):
    if _check_args(input, weight, bias, running_mean, running_var, num_batches_tracked, ghost_batch_size, momentum, eps):
        return _empty_outputs(input, running_mean, running_var, num_batches_tracked, ghost_batch_size)
    forward = _segment_forward if _shape_known(input) else _indexed_forward
    out, mean, invstd, unbiased = forward(input, weight, bias, ghost_batch_size, eps)
    state = _new_state(input, running_mean, running_var, num_batches_tracked, mean, unbiased, momentum)
    return (out, *state, mean, invstd)


def ghost_batch_norm_backward_decomposition(grad_out, input, weight, save_mean, save_invstd, ghost_batch_size, eps):
    if input.numel() == 0:
        return contract.empty_input_grads(input, weight)
    backward = _segment_backward if _shape_known(input) else _indexed_backward
    grad_input, sum_dy, sum_dy_xmu = backward(grad_out, input, weight, save_mean, save_invstd, ghost_batch_size)
    return _input_and_affine_grads(input, weight, grad_input, sum_dy, sum_dy_xmu, save_invstd)


DECOMPOSITIONS = {
    torch.ops.bnfx.ghost_batch_norm.default: ghost_batch_norm_decomposition,
    torch.ops.bnfx.ghost_batch_norm_backward.default: ghost_batch_norm_backward_decomposition,
}


# Double backward and forward-mode AD: the decomposition is the op's differentiable composite.
higher_order.define_composite(ghost_batch_norm, ghost_batch_norm_decomposition)


def _normalized(input, weight, ghost_batch_size, eps):
    return ghost_batch_norm_decomposition(input, weight, None, None, None, None, ghost_batch_size, 0.0, eps)[0]


higher_order.register_double_backward(ghost_batch_norm_backward, _normalized, ("ghost_batch_size", "eps"))
