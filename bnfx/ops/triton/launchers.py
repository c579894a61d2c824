"""Launchers of bnfx's Triton kernels: they take tensors, pick the layout, the tile and the grid.

The input ``x`` is ``[B, C, *spatial]`` (float32, float16 or bfloat16). Chunk ``j`` holds
samples ``[j * chunk_size, min(B, (j + 1) * chunk_size))``; per-(chunk, channel) tensors are
``[nchunks, C]``, ``nchunks = ceil(B / chunk_size)``; plain batch norm is one chunk
(``chunk_size = B``). Contiguous inputs and inputs with channels innermost (channels_last,
channels_last_3d, ``[N, C]``) run as they are, other strides are made contiguous first.

    mean, m2 = moments(x, chunk_size)                      # float64 [nchunks, C]
    out = normalize(x, mean, scale, shift, chunk_size)     # ((x - mean) * scale + shift)
    sum_dy, sum_dy_xmu = backward_sums(dy, x, mean, chunk_size)       # float32 [nchunks, C]
    grad_input = backward_input(dy, x, mean, a, k, c, chunk_size)   # a * dy - k * (x - mean) + c

The tile configurations are chosen in one place, ``tile_config`` and ``merge_config``;
``all_tile_configs`` and ``all_merge_configs`` list every one they can return, and
``bnfx.ops.triton.aot`` compiles each.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
import triton
from torch import Tensor

from bnfx.ops.triton import kernels

TILE = 2048  # elements per [BLOCK_ROWS, BLOCK_COLS] tile
NUM_WARPS = 4
# tile widths, powers of two: positions per row in the channels-first layout, channels per
# row where channels are innermost; the rows fill the rest of the tile
CF_BLOCK_COLS = (16, 32, 64, 128, 256, 512, 1024)
CL_BLOCK_COLS = (16, 32, 64, 128)
# merge tiles [partials, (chunk, channel) pairs]: few partials of many pairs (small splits,
# "cf"), or many partials of few pairs (a few channel blocks split over the whole GPU, "cl")
MERGE_TILES = ((8, 128), (128, 16))
# reductions split each (chunk, channel) over several programs until there are this many per
# SM (a C=64 layer fills an H100), keeping at least MIN_TILES_PER_PROGRAM tiles in each
PROGRAMS_PER_SM = 8
MIN_TILES_PER_PROGRAM = 4
INTERPRETER_SMS = 132  # CPU tensors under TRITON_INTERPRET=1 split as on an H100
MAX_INDEX = 2**30  # rows, positions and (sample, channel) pairs stay int32 with room to spare

LAYOUTS = ("cf", "cl")  # channels first (contiguous), channels innermost
DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # of x; loaded and computed as float32


class TileConfig(NamedTuple):
    layout: str  # "cf", "cl", or "-" for the merge kernels
    block_rows: int
    block_cols: int
    num_warps: int


def tile_config(layout: str, channels: int, positions: int) -> TileConfig:
    """The tile of every kernel for an input of that layout, C and S (spatial size)."""
    width, choices = (positions, CF_BLOCK_COLS) if layout == "cf" else (channels, CL_BLOCK_COLS)
    cols = next((w for w in choices if w >= width), choices[-1])
    return TileConfig(layout, TILE // cols, cols, NUM_WARPS)


def all_tile_configs() -> list[TileConfig]:
    """Every configuration ``tile_config`` can return."""
    return [tile_config("cf", 1, width) for width in CF_BLOCK_COLS] + [
        tile_config("cl", width, 1) for width in CL_BLOCK_COLS
    ]


def merge_config(split: int) -> TileConfig:
    """The tile of the merge kernels for ``split`` partials per (chunk, channel)."""
    rows, cols = next((tile for tile in MERGE_TILES if tile[0] >= split), MERGE_TILES[-1])
    return TileConfig("-", rows, cols, NUM_WARPS)


def all_merge_configs() -> list[TileConfig]:
    """Every configuration ``merge_config`` can return."""
    return [merge_config(rows) for rows, _ in MERGE_TILES]


# the tiled kernels, by launcher and layout, and the merge kernels
TILED_KERNELS = {
    "moments": {"cf": kernels.moments_partial_cf, "cl": kernels.moments_partial_cl},
    "normalize": {"cf": kernels.normalize_cf, "cl": kernels.normalize_cl},
    "backward_sums": {"cf": kernels.backward_sums_partial_cf, "cl": kernels.backward_sums_partial_cl},
    "backward_input": {"cf": kernels.backward_input_cf, "cl": kernels.backward_input_cl},
}
MERGE_KERNELS = (kernels.moments_merge, kernels.sums_merge)


def moments(x: Tensor, chunk_size: int) -> tuple[Tensor, Tensor]:
    """``(mean, m2)``, float64 ``[nchunks, C]``: each (chunk, channel)'s mean and sum of
    squared deviations from it. Needs at least one sample."""
    batch, channels, positions = _dims(x)
    if batch < 1:
        raise ValueError(f"moments needs at least one sample, got a batch of {batch}")
    chunk_size = _chunk_size(chunk_size, batch)
    nchunks = triton.cdiv(batch, chunk_size)
    if x.numel() == 0:  # no channels, or no values per channel
        return (
            torch.full((nchunks, channels), math.nan, dtype=torch.float64, device=x.device),
            torch.zeros((nchunks, channels), dtype=torch.float64, device=x.device),
        )
    layout, x = _layout(x, positions)
    config = tile_config(layout, channels, positions)
    groups, split = _reduction_grid(config, x, chunk_size)
    # float64 [split, nchunks, C] partials (count, mean, M2) of x - K; K float32 [nchunks, C]
    count, mean_d, m2_d = torch.empty((3, split, nchunks, channels), dtype=torch.float64, device=x.device)
    shift = torch.empty((nchunks, channels), dtype=torch.float32, device=x.device)
    TILED_KERNELS["moments"][layout][(groups * split,)](
        x, count, mean_d, m2_d, shift,
        batch, channels, positions, chunk_size, nchunks, split,
        BLOCK_ROWS=config.block_rows, BLOCK_COLS=config.block_cols, num_warps=config.num_warps,
    )
    mean = torch.empty((nchunks, channels), dtype=torch.float64, device=x.device)
    m2 = torch.empty_like(mean)
    stats = nchunks * channels
    merge = merge_config(split)
    kernels.moments_merge[(triton.cdiv(stats, merge.block_cols),)](
        count, mean_d, m2_d, shift, mean, m2, stats, split,
        BLOCK_ROWS=merge.block_rows, BLOCK_COLS=merge.block_cols, num_warps=merge.num_warps,
    )
    return mean, m2


def normalize(x: Tensor, mean: Tensor, scale: Tensor, shift: Tensor | None, chunk_size: int) -> Tensor:
    """``(x - mean[j, c]) * scale[j, c] + shift[c]`` in x's dtype and layout; ``mean``
    float32/float64 and ``scale`` float32 ``[nchunks, C]``, ``shift`` float32 ``[C]`` or None."""
    batch, channels, positions = _dims(x)
    layout, x = _layout(x, positions)
    out = torch.empty_like(x)
    if x.numel() == 0:
        return out
    chunk_size = _chunk_size(chunk_size, batch)
    nchunks = triton.cdiv(batch, chunk_size)
    mean = _per_chunk(mean, "mean", x, nchunks, torch.float64)
    scale = _per_chunk(scale, "scale", x, nchunks, torch.float32)
    if shift is None:
        shift = torch.zeros(channels, dtype=torch.float32, device=x.device)
    elif tuple(shift.shape) != (channels,):
        raise ValueError(f"shift must have shape [C] = [{channels}], got {list(shift.shape)}")
    else:
        shift = shift.to(device=x.device, dtype=torch.float32).contiguous()
    config = tile_config(layout, channels, positions)
    TILED_KERNELS["normalize"][layout][(_elementwise_programs(config, x, chunk_size),)](
        x, out, mean, scale, shift,
        batch, channels, positions, chunk_size,
        BLOCK_ROWS=config.block_rows, BLOCK_COLS=config.block_cols, num_warps=config.num_warps,
    )
    return out


def backward_sums(grad_out: Tensor, x: Tensor, mean: Tensor, chunk_size: int) -> tuple[Tensor, Tensor]:
    """``(sum_dy, sum_dy_xmu)``, float32 ``[nchunks, C]``: per (chunk, channel), the sum of
    dy and of dy * (x - mean). Zeros shaped like ``mean`` when x is empty."""
    batch, channels, positions = _dims(x)
    if x.numel() == 0:
        zeros = torch.zeros(tuple(mean.shape), dtype=torch.float32, device=x.device)
        return zeros, zeros.clone()
    chunk_size = _chunk_size(chunk_size, batch)
    nchunks = triton.cdiv(batch, chunk_size)
    layout, x = _layout(x, positions)
    dy = _in_layout_of(grad_out, x, layout)
    mean = _per_chunk(mean, "mean", x, nchunks, torch.float64)
    config = tile_config(layout, channels, positions)
    groups, split = _reduction_grid(config, x, chunk_size)
    sum_dy = torch.empty((split, nchunks, channels), dtype=torch.float32, device=x.device)
    sum_dy_xmu = torch.empty_like(sum_dy)
    TILED_KERNELS["backward_sums"][layout][(groups * split,)](
        dy, x, mean, sum_dy, sum_dy_xmu,
        batch, channels, positions, chunk_size, nchunks, split,
        BLOCK_ROWS=config.block_rows, BLOCK_COLS=config.block_cols, num_warps=config.num_warps,
    )
    if split == 1:
        return sum_dy[0], sum_dy_xmu[0]
    total_dy = torch.empty((nchunks, channels), dtype=torch.float32, device=x.device)
    total_dy_xmu = torch.empty_like(total_dy)
    stats = nchunks * channels
    merge = merge_config(split)
    kernels.sums_merge[(triton.cdiv(stats, merge.block_cols),)](
        sum_dy, sum_dy_xmu, total_dy, total_dy_xmu, stats, split,
        BLOCK_ROWS=merge.block_rows, BLOCK_COLS=merge.block_cols, num_warps=merge.num_warps,
    )
    return total_dy, total_dy_xmu


def backward_input(
    grad_out: Tensor, x: Tensor, mean: Tensor, a: Tensor, k: Tensor, c: Tensor, chunk_size: int
) -> Tensor:
    """``a[j, c] * dy - k[j, c] * (x - mean[j, c]) + c[j, c]`` in x's dtype and layout;
    ``a``, ``k``, ``c`` float32 ``[nchunks, C]``, ``mean`` float32/float64."""
    batch, channels, positions = _dims(x)
    layout, x = _layout(x, positions)
    grad_input = torch.empty_like(x)
    if x.numel() == 0:
        return grad_input
    chunk_size = _chunk_size(chunk_size, batch)
    nchunks = triton.cdiv(batch, chunk_size)
    dy = _in_layout_of(grad_out, x, layout)
    mean = _per_chunk(mean, "mean", x, nchunks, torch.float64)
    a, k, c = (_per_chunk(t, name, x, nchunks, torch.float32) for t, name in ((a, "a"), (k, "k"), (c, "c")))
    config = tile_config(layout, channels, positions)
    TILED_KERNELS["backward_input"][layout][(_elementwise_programs(config, x, chunk_size),)](
        dy, x, grad_input, mean, a, k, c,
        batch, channels, positions, chunk_size,
        BLOCK_ROWS=config.block_rows, BLOCK_COLS=config.block_cols, num_warps=config.num_warps,
    )
    return grad_input


def _dims(x: Tensor) -> tuple[int, int, int]:
    """``(B, C, S)`` of ``x [B, C, *spatial]``, S the number of spatial positions."""
    if x.dim() < 2:
        raise ValueError(f"x must be [B, C, *spatial], got shape {list(x.shape)}")
    if x.dtype not in DTYPES:
        raise TypeError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    return x.shape[0], x.shape[1], math.prod(x.shape[2:])


def _chunk_size(chunk_size: int, batch: int) -> int:
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size}")
    return min(chunk_size, batch)  # a chunk larger than the batch is the batch


def _channels_innermost(t: Tensor) -> bool:
    return t.permute(0, *range(2, t.dim()), 1).is_contiguous()


def _layout(x: Tensor, positions: int) -> tuple[str, Tensor]:
    """``("cf" | "cl", x)``, x made contiguous unless its layout is one of the two."""
    if not x.is_contiguous() and not _channels_innermost(x):
        x = x.contiguous()
    # both at once only where S == 1 or C == 1: rows of C values, or one channel's run
    layout = "cl" if _channels_innermost(x) and (positions == 1 or not x.is_contiguous()) else "cf"
    batch, channels, _ = _dims(x)
    rows, cols = (batch * channels, positions) if layout == "cf" else (batch * positions, channels)
    if max(rows, cols) > MAX_INDEX:
        raise ValueError(
            f"x of shape {list(x.shape)} is too large for the Triton kernels' 32-bit indices: "
            f"{rows} {'(sample, channel) pairs' if layout == 'cf' else 'positions'} of {cols} "
            f"{'positions' if layout == 'cf' else 'channels'}, at most {MAX_INDEX} of either"
        )
    return layout, x


def _in_layout_of(grad_out: Tensor, x: Tensor, layout: str) -> Tensor:
    """``grad_out`` with x's dtype and memory layout (a copy only when it differs)."""
    if grad_out.shape != x.shape:
        raise ValueError(f"grad_out must have x's shape {list(x.shape)}, got {list(grad_out.shape)}")
    same_layout = grad_out.is_contiguous() if layout == "cf" else _channels_innermost(grad_out)
    if grad_out.dtype == x.dtype and grad_out.device == x.device and same_layout:
        return grad_out
    return torch.empty_like(x).copy_(grad_out)


def _per_chunk(t: Tensor, name: str, x: Tensor, nchunks: int, dtype: torch.dtype) -> Tensor:
    channels = x.shape[1]
    if tuple(t.shape) != (nchunks, channels):
        raise ValueError(f"{name} must have shape [nchunks, C] = [{nchunks}, {channels}], got {list(t.shape)}")
    return t.to(device=x.device, dtype=dtype).contiguous()


def _reduction_grid(config: TileConfig, x: Tensor, chunk_size: int) -> tuple[int, int]:
    """``(groups, split)``: a reduction runs ``groups * split`` programs, ``split`` per
    (chunk, channel) in "cf", per (chunk, channel block) in "cl"."""
    batch, channels, positions = _dims(x)
    nchunks = triton.cdiv(batch, chunk_size)
    if config.layout == "cf":
        groups = nchunks * channels
        tiles = triton.cdiv(chunk_size, config.block_rows) * triton.cdiv(positions, config.block_cols)
    else:
        groups = nchunks * triton.cdiv(channels, config.block_cols)
        tiles = triton.cdiv(chunk_size * positions, config.block_rows)
    wanted = triton.cdiv(PROGRAMS_PER_SM * _sm_count(x.device), groups)
    return groups, max(1, min(wanted, tiles // MIN_TILES_PER_PROGRAM))


def _elementwise_programs(config: TileConfig, x: Tensor, chunk_size: int) -> int:
    batch, channels, positions = _dims(x)
    if config.layout == "cf":
        return triton.cdiv(batch * channels, config.block_rows) * triton.cdiv(positions, config.block_cols)
    nchunks = triton.cdiv(batch, chunk_size)
    return nchunks * triton.cdiv(chunk_size * positions, config.block_rows) * triton.cdiv(channels, config.block_cols)


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return INTERPRETER_SMS
