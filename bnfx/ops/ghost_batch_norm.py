"""torch.ops.bnfx.ghost_batch_norm: batch norm with statistics per virtual sub-batch.

The batch is split as ``input.chunk(ceil(B / ghost_batch_size), 0)`` splits it (MosaicML
Composer's GhostBatchNorm): ``B // chunk_size`` chunks of ``chunk_size`` samples, then one
shorter chunk of ``B % chunk_size`` when that is not zero. Each chunk is normalized with
its own mean and biased variance. The running statistics end where Composer's sequential
per-chunk updates end (momentum / nchunks per chunk, unbiased variance), computed in closed
form; with ``momentum=None`` every chunk counts as one batch of the cumulative average.

The CPU (and generic) kernel regroups the equal chunks into channels,
``[k*s, C, ...] -> [s, k*C, ...]``, so that one native batch-norm call computes every
chunk's statistics: no Python loop over chunks.
"""

from __future__ import annotations

import torch
from torch import Tensor

_batch_norm = torch.ops.aten._native_batch_norm_legit.no_stats
_batch_norm_backward = torch.ops.aten.native_batch_norm_backward.default


def ghost_chunk_layout(batch: int, ghost_batch_size: int) -> tuple[int, int, int]:
    """``(chunk_size, equal_chunks, last_size)`` of ``batch`` samples split as Composer does.

    ``equal_chunks`` chunks of ``chunk_size`` samples come first; ``last_size`` (possibly 0)
    samples form one more chunk. The number of chunks is always ``ceil(batch / ghost_batch_size)``.
    """
    nchunks = (batch + ghost_batch_size - 1) // ghost_batch_size
    chunk_size = (batch + nchunks - 1) // nchunks
    return chunk_size, batch // chunk_size, batch % chunk_size


def ghost_chunk_count(batch: int, ghost_batch_size: int) -> int:
    return (batch + ghost_batch_size - 1) // ghost_batch_size


def _stat_dtype(input: Tensor) -> torch.dtype:
    return torch.promote_types(input.dtype, torch.float32)


def _check_args(input: Tensor, ghost_batch_size: int, running_mean, momentum, num_batches_tracked):
    if ghost_batch_size < 1:
        raise ValueError(f"ghost_batch_size must be a positive int, got {ghost_batch_size}")
    if input.dim() < 2:
        raise ValueError(f"input must have at least 2 dimensions (N, C, ...), got shape {tuple(input.shape)}")
    if input.shape[0] == 0:
        raise ValueError("input must have a non-empty batch dimension, got batch size 0")
    chunk_size, _, last = ghost_chunk_layout(input.shape[0], ghost_batch_size)
    if (last or chunk_size) * input[0, 0].numel() == 1:
        raise ValueError(
            f"ghost batch norm needs more than 1 value per channel in every ghost batch, got a "
            f"ghost batch of 1 sample of shape {tuple(input.shape[1:])} "
            f"(batch size {input.shape[0]}, ghost_batch_size={ghost_batch_size})"
        )
    if running_mean is not None and momentum is None and num_batches_tracked is None:
        raise ValueError("momentum=None (cumulative average) needs num_batches_tracked, got None")


def _regroup(x: Tensor, chunks: int) -> Tensor:
    """[chunks*s, C, ...] -> [s, chunks*C, ...]: chunk j's channel c becomes channel j*C + c."""
    if chunks == 1:
        return x
    return x.unflatten(0, (chunks, -1)).transpose(0, 1).flatten(1, 2)


def _ungroup_into(dest: Tensor, grouped: Tensor, chunks: int) -> None:
    """Inverse of _regroup, written into ``dest`` ([chunks*s, C, ...]) in its own layout."""
    if chunks == 1:
        dest.copy_(grouped)
        return
    dest.unflatten(0, (chunks, -1)).copy_(grouped.unflatten(1, (chunks, -1)).transpose(0, 1))


def _affine(weight: Tensor | None, bias: Tensor | None, input: Tensor) -> tuple[Tensor, Tensor | None]:
    # Parameters in fp32 (or wider) select torch's mixed-dtype kernels for low-precision input,
    # so statistics stay in fp32; without a weight, ones give backward one code path.
    dtype = _stat_dtype(input)
    if weight is None:
        return torch.ones(input.shape[1], dtype=dtype, device=input.device), None if bias is None else bias.to(dtype)
    return weight.to(dtype), None if bias is None else bias.to(dtype)


def _chunk_counts(input: Tensor, chunk_size: int, equal: int, last: int) -> Tensor:
    """[nchunks, 1] number of values per channel in each chunk."""
    per_sample = input[0, 0].numel()
    counts = torch.full((equal + (1 if last else 0), 1), float(chunk_size * per_sample), dtype=torch.float64, device=input.device)
    if last:
        counts[-1] = float(last * per_sample)
    return counts


def _new_running_stats(
    running_mean: Tensor,
    running_var: Tensor,
    num_batches_tracked: Tensor | None,
    means: Tensor,  # [nchunks, C]
    unbiased_vars: Tensor,  # [nchunks, C]
    momentum: float | None,
) -> tuple[Tensor, Tensor]:
    nchunks = means.shape[0]
    means, unbiased_vars = means.double(), unbiased_vars.double()
    old_mean, old_var = running_mean.double(), running_var.double()
    if momentum is None:
        # Each chunk is one batch of the cumulative average: n0 batches seen before.
        seen = num_batches_tracked.double()
        new_mean = (old_mean * seen + means.sum(0)) / (seen + nchunks)
        new_var = (old_var * seen + unbiased_vars.sum(0)) / (seen + nchunks)
    else:
        # Composer's sequential updates r <- (1 - f) r + f x_j with f = momentum / nchunks,
        # unrolled: chunk j is weighted f (1 - f)^(nchunks - 1 - j).
        f = momentum / nchunks
        ages = torch.arange(nchunks - 1, -1, -1, dtype=torch.float64, device=means.device)
        weights = (f * (1.0 - f) ** ages).unsqueeze(1)  # [nchunks, 1]
        keep = (1.0 - f) ** nchunks
        new_mean = old_mean * keep + (weights * means).sum(0)
        new_var = old_var * keep + (weights * unbiased_vars).sum(0)
    return new_mean.to(running_mean.dtype), new_var.to(running_var.dtype)


@torch.library.custom_op("bnfx::ghost_batch_norm", mutates_args=())
def ghost_batch_norm(
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
    _check_args(input, ghost_batch_size, running_mean, momentum, num_batches_tracked)
    chunk_size, equal, last = ghost_chunk_layout(input.shape[0], ghost_batch_size)
    channels = input.shape[1]
    weight, bias = _affine(weight, bias, input)
    head = input[: equal * chunk_size]
    out = torch.empty_like(input)

    grouped_out, mean, invstd = _batch_norm(
        _regroup(head, equal),
        weight.repeat(equal),
        None if bias is None else bias.repeat(equal),
        True,
        0.0,
        eps,
    )
    _ungroup_into(out[: equal * chunk_size], grouped_out, equal)
    means, invstds = [mean.view(equal, channels)], [invstd.view(equal, channels)]
    if last:
        tail_out, tail_mean, tail_invstd = _batch_norm(input[equal * chunk_size :], weight, bias, True, 0.0, eps)
        out[equal * chunk_size :].copy_(tail_out)
        means.append(tail_mean.view(1, channels))
        invstds.append(tail_invstd.view(1, channels))
    save_mean = torch.cat(means).to(_stat_dtype(input))  # [nchunks, C]
    save_invstd = torch.cat(invstds).to(_stat_dtype(input))  # [nchunks, C]

    if running_mean is None:
        new_mean, new_var = input.new_empty(0), input.new_empty(0)
    else:
        counts = _chunk_counts(input, chunk_size, equal, last)  # [nchunks, 1]
        biased = (save_invstd.double().pow(-2) - eps).clamp_min(0.0)
        unbiased = biased * counts / (counts - 1).clamp_min(1.0)
        new_mean, new_var = _new_running_stats(
            running_mean, running_var, num_batches_tracked, save_mean, unbiased, momentum
        )
    nchunks = equal + (1 if last else 0)
    new_tracked = input.new_empty(0) if num_batches_tracked is None else num_batches_tracked + nchunks
    return out, new_mean, new_var, new_tracked, save_mean, save_invstd


@ghost_batch_norm.register_fake
def _(input, weight, bias, running_mean, running_var, num_batches_tracked, ghost_batch_size, momentum, eps):
    _check_args(input, ghost_batch_size, running_mean, momentum, num_batches_tracked)
    nchunks = ghost_chunk_count(input.shape[0], ghost_batch_size)
    stats = input.new_empty((nchunks, input.shape[1]), dtype=_stat_dtype(input))

    def like(state):
        return input.new_empty(0) if state is None else torch.empty_like(state)

    return (
        torch.empty_like(input),
        like(running_mean),
        like(running_var),
        like(num_batches_tracked),
        stats,
        torch.empty_like(stats),
    )


@torch.library.custom_op("bnfx::ghost_batch_norm_backward", mutates_args=())
def ghost_batch_norm_backward(
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
    chunk_size, equal, last = ghost_chunk_layout(input.shape[0], ghost_batch_size)
    channels = input.shape[1]
    has_affine = weight is not None
    param_dtype = weight.dtype if has_affine else None
    weight, _ = _affine(weight, None, input)
    split = equal * chunk_size
    grad_input = torch.empty_like(input)

    grouped_grad, grad_weight, grad_bias = _batch_norm_backward(
        _regroup(grad_out[:split], equal),
        _regroup(input[:split], equal),
        weight.repeat(equal),
        None,
        None,
        save_mean[:equal].flatten(),
        save_invstd[:equal].flatten(),
        True,
        eps,
        [True, has_affine, has_affine],
    )
    _ungroup_into(grad_input[:split], grouped_grad, equal)
    if has_affine:
        grad_weight = grad_weight.view(equal, channels).sum(0)
        grad_bias = grad_bias.view(equal, channels).sum(0)
    if last:
        tail_grad, tail_weight, tail_bias = _batch_norm_backward(
            grad_out[split:],
            input[split:],
            weight,
            None,
            None,
            save_mean[equal],
            save_invstd[equal],
            True,
            eps,
            [True, has_affine, has_affine],
        )
        grad_input[split:].copy_(tail_grad)
        if has_affine:
            grad_weight = grad_weight + tail_weight
            grad_bias = grad_bias + tail_bias
    if not has_affine:
        return grad_input, input.new_empty(0), input.new_empty(0)
    return grad_input, grad_weight.to(param_dtype), grad_bias.to(param_dtype)


@ghost_batch_norm_backward.register_fake
def _(grad_out, input, weight, save_mean, save_invstd, ghost_batch_size, eps):
    if weight is None:
        return torch.empty_like(input), input.new_empty(0), input.new_empty(0)
    return torch.empty_like(input), torch.empty_like(weight), torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    input, weight, bias, *_state, ghost_batch_size, _momentum, eps = inputs
    _out, new_mean, new_var, new_tracked, save_mean, save_invstd = output
    ctx.mark_non_differentiable(new_mean, new_var, new_tracked, save_mean, save_invstd)
    ctx.save_for_backward(input, weight, save_mean, save_invstd)
    ctx.ghost_batch_size = ghost_batch_size
    ctx.eps = eps
    ctx.has_bias = bias is not None


def _backward(ctx, grad_out, *_state_grads):
    input, weight, save_mean, save_invstd = ctx.saved_tensors
    grad_input, grad_weight, grad_bias = torch.ops.bnfx.ghost_batch_norm_backward(
        grad_out, input, weight, save_mean, save_invstd, ctx.ghost_batch_size, ctx.eps
    )
    if weight is None:
        grad_weight = grad_bias = None
    elif not ctx.has_bias:
        grad_bias = None
    return grad_input, grad_weight, grad_bias, None, None, None, None, None, None


ghost_batch_norm.register_autograd(_backward, setup_context=_setup_context)
