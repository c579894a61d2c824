"""Triton kernels of bnfx's batch norm, per (chunk, channel) of an input ``[B, C, *spatial]``.

Chunk ``j`` holds samples ``[j * chunk_size, min(B, (j + 1) * chunk_size))``; ``S`` is the
number of spatial positions. Two layouts, one kernel each:

- ``_cf`` (channels first, contiguous NCHW): element ``(b, c, s)`` at ``(b * C + c) * S + s``;
- ``_cl`` (channels innermost: channels_last, channels_last_3d, ``[N, C]``): position
  ``p = b * S + s`` is a row of ``C`` values, element ``(b, c, s)`` at ``p * C + c``.

Tiles are ``[BLOCK_ROWS, BLOCK_COLS]`` with the columns contiguous in memory: spatial
positions in ``_cf`` kernels, channels in ``_cl`` kernels. Elements are loaded as float32 and
computed on in float32; per-tile statistics are merged in float64, within a program and
across programs (a reduction splits each (chunk, channel) over ``split`` programs, whose
partials a ``_merge`` kernel adds up).

Accuracy: ``moments`` shifts each (chunk, channel) by one of its own values ``K`` (its first
one), so that ``x - K`` is exact and small, takes each tile's mean and M2 in two passes over
registers and merges tiles with Chan's formula; the other kernels center with a float64 mean
split into ``hi + lo`` float32 parts, ``(x - hi) - lo``, which is exact to float32 rounding
where ``x - mean`` would lose the low bits of the mean.
"""

import triton
import triton.language as tl


@triton.jit
def _hi_lo(mean):
    """A float64 mean as float32 ``hi + lo``: ``(x - hi) - lo`` keeps the digits ``x - mean``
    in float32 would lose."""
    hi = mean.to(tl.float32)
    return hi, (mean - hi.to(tl.float64)).to(tl.float32)


@triton.jit
def _cf_elementwise_tile(pid, B, C, S, chunk_size, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    """The elements of program ``pid`` of an elementwise ``_cf`` kernel: rows of (sample,
    channel) pairs, columns of positions. Returns ``(row_mask, channel, param, mask,
    offsets)``, ``param`` the (chunk, channel) index of each row."""
    col_tiles = tl.cdiv(S, BLOCK_COLS)
    tr = pid // col_tiles
    tc = pid - tr * col_tiles
    row = tr * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)  # b * C + c
    row_mask = row < B * C
    b = row // C
    channel = row - b * C
    param = (b // chunk_size) * C + channel
    s = tc * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    mask = row_mask[:, None] & (s < S)[None, :]
    offsets = row.to(tl.int64)[:, None] * S + s[None, :]
    return row_mask, channel, param, mask, offsets


@triton.jit
def _cl_elementwise_tile(pid, B, C, S, chunk_size, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    """The elements of program ``pid`` of an elementwise ``_cl`` kernel: ``(chunk j, row tile,
    channel block)``, inside chunk j so that the parameters are one vector per program.
    Returns ``(c_mask, channel, param, mask, offsets)``."""
    col_blocks = tl.cdiv(C, BLOCK_COLS)
    row_tiles = tl.cdiv(chunk_size * S, BLOCK_ROWS)
    cb = pid % col_blocks
    jt = pid // col_blocks
    j = jt // row_tiles
    tr = jt - j * row_tiles
    r0 = j * chunk_size * S
    r1 = r0 + tl.minimum(B * S - r0, chunk_size * S)
    channel = cb * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    c_mask = channel < C
    p = r0 + tr * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    mask = (p < r1)[:, None] & c_mask[None, :]
    offsets = p.to(tl.int64)[:, None] * C + channel[None, :]
    return c_mask, channel, j * C + channel, mask, offsets


@triton.jit
def _cf_reduction_range(pid, B, C, S, chunk_size, nchunks, split,
                        BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    """Program ``(k, j, c)`` of a ``_cf`` reduction: its (chunk j, channel c) and its range
    ``[t0, t1)``, the k-th of ``split`` ranges of the pair's tiles. Returns ``(k, jc, c, b0,
    nb, t0, t1)``: ``jc`` the pair's index, ``b0`` and ``nb`` the chunk's first sample and size."""
    stats = nchunks * C
    k = pid // stats
    jc = pid - k * stats
    j = jc // C
    c = jc - j * C
    b0 = j * chunk_size
    nb = tl.minimum(B - b0, chunk_size)
    tiles = tl.cdiv(nb, BLOCK_ROWS) * tl.cdiv(S, BLOCK_COLS)
    per_program = tl.cdiv(tiles, split)
    t0 = k * per_program
    return k, jc, c, b0, nb, t0, tl.minimum(t0 + per_program, tiles)


@triton.jit
def _cf_reduction_tile(t, c, b0, nb, C, S, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    """Tile ``t`` of (chunk, channel c): rows of samples, columns of positions. Returns
    ``(tr, tc, mask, offsets)``."""
    col_tiles = tl.cdiv(S, BLOCK_COLS)
    tr = t // col_tiles
    tc = t - tr * col_tiles
    b = b0 + tr * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    s = tc * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    mask = (b < b0 + nb)[:, None] & (s < S)[None, :]
    offsets = (b.to(tl.int64) * C + c)[:, None] * S + s[None, :]
    return tr, tc, mask, offsets


@triton.jit
def _cl_reduction_range(pid, B, C, S, chunk_size, nchunks, split,
                        BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    """Program ``(k, j, cb)`` of a ``_cl`` reduction: chunk j, channel block cb, and the k-th
    of ``split`` ranges ``[t0, t1)`` of the chunk's row tiles. Returns ``(k, j, channel, r0,
    nr, t0, t1)``: ``r0`` and ``nr`` the chunk's first position row and its number of rows."""
    col_blocks = tl.cdiv(C, BLOCK_COLS)
    k = pid // (nchunks * col_blocks)
    jb = pid - k * (nchunks * col_blocks)
    j = jb // col_blocks
    cb = jb - j * col_blocks
    r0 = j * chunk_size * S
    nr = tl.minimum(B * S - r0, chunk_size * S)
    tiles = tl.cdiv(nr, BLOCK_ROWS)
    per_program = tl.cdiv(tiles, split)
    t0 = k * per_program
    channel = cb * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    return k, j, channel, r0, nr, t0, tl.minimum(t0 + per_program, tiles)


@triton.jit
def _cl_reduction_tile(t, channel, r0, nr, C, BLOCK_ROWS: tl.constexpr):
    """Row tile ``t`` of a chunk of channels-innermost input. Returns ``(mask, offsets)``."""
    p = r0 + t * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    mask = (p < r0 + nr)[:, None] & (channel < C)[None, :]
    return mask, p.to(tl.int64)[:, None] * C + channel[None, :]


@triton.jit(do_not_specialize=["B", "chunk_size", "nchunks", "split"])
def moments_partial_cf(
    x_ptr, n_ptr, mean_ptr, m2_ptr, shift_ptr,
    B, C, S, chunk_size, nchunks, split,
    BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
):
    """Program ``(k, j, c)``: count, mean and M2 of ``x - K`` (float64) over the k-th of
    ``split`` ranges of tiles of (chunk j, channel c). Rows: samples of the chunk; columns:
    positions. K, x's first value in (chunk j, channel c), is written to ``shift_ptr``."""
    pid = tl.program_id(0)
    k, jc, c, b0, nb, t0, t1 = _cf_reduction_range(
        pid, B, C, S, chunk_size, nchunks, split, BLOCK_ROWS, BLOCK_COLS
    )

    shift = tl.load(x_ptr + (b0.to(tl.int64) * C + c) * S).to(tl.float32)
    # running (n, mean, m2) of the program's tiles, float64: merging hundreds of tiles in
    # float32 would add their rounding errors
    n = tl.zeros([], tl.float64)
    mean = tl.zeros([], tl.float64)
    m2 = tl.zeros([], tl.float64)
    for t in range(t0, t1):
        tr, tc, mask, offsets = _cf_reduction_tile(t, c, b0, nb, C, S, BLOCK_ROWS, BLOCK_COLS)
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        d = tl.where(mask, x - shift, 0.0)
        tile_count = tl.minimum(nb - tr * BLOCK_ROWS, BLOCK_ROWS) * tl.minimum(S - tc * BLOCK_COLS, BLOCK_COLS)
        tile_mean = tl.sum(d) / tile_count.to(tl.float32)
        centered = tl.where(mask, d - tile_mean, 0.0)
        tile_m2 = tl.sum(centered * centered)
        # Chan's merge of (n, mean, m2) with the tile's
        tile_n = tile_count.to(tl.float64)
        weight = tile_n / (n + tile_n)
        delta = tile_mean.to(tl.float64) - mean
        mean += delta * weight
        m2 += tile_m2.to(tl.float64) + delta * delta * n * weight
        n += tile_n

    tl.store(n_ptr + pid, n)
    tl.store(mean_ptr + pid, mean)
    tl.store(m2_ptr + pid, m2)
    tl.store(shift_ptr + jc, shift, mask=k == 0)


@triton.jit(do_not_specialize=["B", "chunk_size", "nchunks", "split"])
def moments_partial_cl(
    x_ptr, n_ptr, mean_ptr, m2_ptr, shift_ptr,
    B, C, S, chunk_size, nchunks, split,
    BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
):
    """Program ``(k, j, cb)``: count, mean and M2 of ``x - K`` per channel of channel block
    cb over the k-th of ``split`` ranges of row tiles of chunk j. Rows: positions."""
    k, j, c, r0, nr, t0, t1 = _cl_reduction_range(
        tl.program_id(0), B, C, S, chunk_size, nchunks, split, BLOCK_ROWS, BLOCK_COLS
    )
    c_mask = c < C
    shift = tl.load(x_ptr + r0.to(tl.int64) * C + c, mask=c_mask, other=0.0).to(tl.float32)
    n = tl.zeros([], tl.float64)  # float64 as in moments_partial_cf
    mean = tl.zeros([BLOCK_COLS], tl.float64)
    m2 = tl.zeros([BLOCK_COLS], tl.float64)
    for t in range(t0, t1):
        mask, offsets = _cl_reduction_tile(t, c, r0, nr, C, BLOCK_ROWS)
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        d = tl.where(mask, x - shift[None, :], 0.0)
        tile_count = tl.minimum(nr - t * BLOCK_ROWS, BLOCK_ROWS)
        tile_mean = tl.sum(d, axis=0) / tile_count.to(tl.float32)
        centered = tl.where(mask, d - tile_mean[None, :], 0.0)
        tile_m2 = tl.sum(centered * centered, axis=0)
        tile_n = tile_count.to(tl.float64)
        weight = tile_n / (n + tile_n)
        delta = tile_mean.to(tl.float64) - mean
        mean += delta * weight
        m2 += tile_m2.to(tl.float64) + delta * delta * (n * weight)
        n += tile_n

    out = (k * nchunks + j) * C + c
    tl.store(n_ptr + out, tl.zeros([BLOCK_COLS], tl.float64) + n, mask=c_mask)
    tl.store(mean_ptr + out, mean, mask=c_mask)
    tl.store(m2_ptr + out, m2, mask=c_mask)
    tl.store(shift_ptr + j * C + c, shift, mask=c_mask & (k == 0))


@triton.jit(do_not_specialize=["stats", "split"])
def moments_merge(
    n_ptr, mean_ptr, m2_ptr, shift_ptr, out_mean_ptr, out_m2_ptr,
    stats, split,
    BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
):
    """Merge the ``split`` float64 partials of each of ``stats`` (chunk, channel) pairs and
    add the shift K back. Partial k of pair i is at ``k * stats + i``; tiles are
    ``[BLOCK_ROWS partials, BLOCK_COLS pairs]``, each merged in two passes, then into the
    running result with Chan's formula."""
    i = tl.program_id(0) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    i_mask = i < stats
    rows = tl.arange(0, BLOCK_ROWS)
    n = tl.zeros([BLOCK_COLS], tl.float64)
    mean = tl.zeros([BLOCK_COLS], tl.float64)
    m2 = tl.zeros([BLOCK_COLS], tl.float64)
    for k0 in range(0, split, BLOCK_ROWS):
        k = k0 + rows
        mask = (k < split)[:, None] & i_mask[None, :]
        offsets = k[:, None] * stats + i[None, :]
        part_n = tl.load(n_ptr + offsets, mask=mask, other=0.0)
        part_mean = tl.load(mean_ptr + offsets, mask=mask, other=0.0)
        part_m2 = tl.load(m2_ptr + offsets, mask=mask, other=0.0)
        tile_n = tl.sum(part_n, axis=0)
        tile_mean = tl.sum(part_n * part_mean, axis=0) / tl.maximum(tile_n, 1.0)
        deviation = part_mean - tile_mean[None, :]
        tile_m2 = tl.sum(part_m2 + part_n * deviation * deviation, axis=0)
        total = n + tile_n
        weight = tile_n / tl.maximum(total, 1.0)  # empty ranges (n == 0) add nothing
        delta = tile_mean - mean
        mean += delta * weight
        m2 += tile_m2 + delta * delta * n * weight
        n = total
    shift = tl.load(shift_ptr + i, mask=i_mask, other=0.0).to(tl.float64)
    tl.store(out_mean_ptr + i, shift + mean, mask=i_mask)
    tl.store(out_m2_ptr + i, m2, mask=i_mask)


@triton.jit(do_not_specialize=["B", "chunk_size"])
def normalize_cf(
    x_ptr, out_ptr, mean_ptr, scale_ptr, shift_ptr,
    B, C, S, chunk_size,
    BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
):
    """``out = ((x - hi) - lo) * scale + shift``. Parameters are gathered per row, once per
    BLOCK_COLS elements."""
    row_mask, channel, param, mask, offsets = _cf_elementwise_tile(
        tl.program_id(0), B, C, S, chunk_size, BLOCK_ROWS, BLOCK_COLS
    )
    hi, lo = _hi_lo(tl.load(mean_ptr + param, mask=row_mask, other=0.0))
    scale = tl.load(scale_ptr + param, mask=row_mask, other=0.0)
    shift = tl.load(shift_ptr + channel, mask=row_mask, other=0.0)
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    out = ((x - hi[:, None]) - lo[:, None]) * scale[:, None] + shift[:, None]
    tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["B", "chunk_size"])
def normalize_cl(
    x_ptr, out_ptr, mean_ptr, scale_ptr, shift_ptr,
    B, C, S, chunk_size,
    BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
):
    """``out = ((x - hi) - lo) * scale + shift``, one parameter vector per program."""
    c_mask, channel, param, mask, offsets = _cl_elementwise_tile(
        tl.program_id(0), B, C, S, chunk_size, BLOCK_ROWS, BLOCK_COLS
    )
    hi, lo = _hi_lo(tl.load(mean_ptr + param, mask=c_mask, other=0.0))
    scale = tl.load(scale_ptr + param, mask=c_mask, other=0.0)
    shift = tl.load(shift_ptr + channel, mask=c_mask, other=0.0)
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    out = ((x - hi[None, :]) - lo[None, :]) * scale[None, :] + shift[None, :]
    tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["B", "chunk_size", "nchunks", "split"])
def backward_sums_partial_cf(
    dy_ptr, x_ptr, mean_ptr, sum_dy_ptr, sum_dy_xmu_ptr,
    B, C, S, chunk_size, nchunks, split,
    BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
):
    """Program ``(k, j, c)``: sums of dy and dy * (x - mean) over the k-th of ``split``
    ranges of tiles of (chunk j, channel c), in per-lane float32 accumulators."""
    pid = tl.program_id(0)
    k, jc, c, b0, nb, t0, t1 = _cf_reduction_range(
        pid, B, C, S, chunk_size, nchunks, split, BLOCK_ROWS, BLOCK_COLS
    )

    mean = tl.load(mean_ptr + jc)
    hi, lo = _hi_lo(mean)
    acc_dy = tl.zeros([BLOCK_ROWS, BLOCK_COLS], tl.float32)
    acc_dy_xmu = tl.zeros([BLOCK_ROWS, BLOCK_COLS], tl.float32)
    for t in range(t0, t1):
        _, _, mask, offsets = _cf_reduction_tile(t, c, b0, nb, C, S, BLOCK_ROWS, BLOCK_COLS)
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        acc_dy += dy
        acc_dy_xmu += dy * ((x - hi) - lo)  # dy is 0 where masked
    tl.store(sum_dy_ptr + pid, tl.sum(acc_dy))
    tl.store(sum_dy_xmu_ptr + pid, tl.sum(acc_dy_xmu))


@triton.jit(do_not_specialize=["B", "chunk_size", "nchunks", "split"])
def backward_sums_partial_cl(
    dy_ptr, x_ptr, mean_ptr, sum_dy_ptr, sum_dy_xmu_ptr,
    B, C, S, chunk_size, nchunks, split,
    BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
):
    """Program ``(k, j, cb)``: per-channel sums of dy and dy * (x - mean) over the k-th of
    ``split`` ranges of row tiles of chunk j."""
    k, j, c, r0, nr, t0, t1 = _cl_reduction_range(
        tl.program_id(0), B, C, S, chunk_size, nchunks, split, BLOCK_ROWS, BLOCK_COLS
    )
    c_mask = c < C
    mean = tl.load(mean_ptr + j * C + c, mask=c_mask, other=0.0)
    hi, lo = _hi_lo(mean)
    acc_dy = tl.zeros([BLOCK_ROWS, BLOCK_COLS], tl.float32)
    acc_dy_xmu = tl.zeros([BLOCK_ROWS, BLOCK_COLS], tl.float32)
    for t in range(t0, t1):
        mask, offsets = _cl_reduction_tile(t, c, r0, nr, C, BLOCK_ROWS)
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        acc_dy += dy
        acc_dy_xmu += dy * ((x - hi[None, :]) - lo[None, :])  # dy is 0 where masked
    out = (k * nchunks + j) * C + c
    tl.store(sum_dy_ptr + out, tl.sum(acc_dy, axis=0), mask=c_mask)
    tl.store(sum_dy_xmu_ptr + out, tl.sum(acc_dy_xmu, axis=0), mask=c_mask)


@triton.jit(do_not_specialize=["stats", "split"])
def sums_merge(
    part_a_ptr, part_b_ptr, out_a_ptr, out_b_ptr,
    stats, split,
    BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
):
    """Add the ``split`` float32 partials of two sums per (chunk, channel) in float64, over
    tiles of ``[BLOCK_ROWS partials, BLOCK_COLS pairs]`` as in ``moments_merge``."""
    i = tl.program_id(0) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    i_mask = i < stats
    rows = tl.arange(0, BLOCK_ROWS)
    a = tl.zeros([BLOCK_COLS], tl.float64)
    b = tl.zeros([BLOCK_COLS], tl.float64)
    for k0 in range(0, split, BLOCK_ROWS):
        k = k0 + rows
        mask = (k < split)[:, None] & i_mask[None, :]
        offsets = k[:, None] * stats + i[None, :]
        a += tl.sum(tl.load(part_a_ptr + offsets, mask=mask, other=0.0).to(tl.float64), axis=0)
        b += tl.sum(tl.load(part_b_ptr + offsets, mask=mask, other=0.0).to(tl.float64), axis=0)
    tl.store(out_a_ptr + i, a.to(tl.float32), mask=i_mask)
    tl.store(out_b_ptr + i, b.to(tl.float32), mask=i_mask)


@triton.jit(do_not_specialize=["B", "chunk_size"])
def backward_input_cf(
    dy_ptr, x_ptr, out_ptr, mean_ptr, a_ptr, k_ptr, c_ptr,
    B, C, S, chunk_size,
    BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
):
    """``grad_input = a * dy - k * ((x - hi) - lo) + c``; tiled as ``normalize_cf``."""
    row_mask, _, param, mask, offsets = _cf_elementwise_tile(
        tl.program_id(0), B, C, S, chunk_size, BLOCK_ROWS, BLOCK_COLS
    )
    hi, lo = _hi_lo(tl.load(mean_ptr + param, mask=row_mask, other=0.0))
    a = tl.load(a_ptr + param, mask=row_mask, other=0.0)
    k = tl.load(k_ptr + param, mask=row_mask, other=0.0)
    c = tl.load(c_ptr + param, mask=row_mask, other=0.0)
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    grad = a[:, None] * dy - k[:, None] * ((x - hi[:, None]) - lo[:, None]) + c[:, None]
    tl.store(out_ptr + offsets, grad.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["B", "chunk_size"])
def backward_input_cl(
    dy_ptr, x_ptr, out_ptr, mean_ptr, a_ptr, k_ptr, c_ptr,
    B, C, S, chunk_size,
    BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
):
    """``grad_input = a * dy - k * ((x - hi) - lo) + c``; tiled as ``normalize_cl``."""
    c_mask, _, param, mask, offsets = _cl_elementwise_tile(
        tl.program_id(0), B, C, S, chunk_size, BLOCK_ROWS, BLOCK_COLS
    )
    hi, lo = _hi_lo(tl.load(mean_ptr + param, mask=c_mask, other=0.0))
    a = tl.load(a_ptr + param, mask=c_mask, other=0.0)
    k = tl.load(k_ptr + param, mask=c_mask, other=0.0)
    c = tl.load(c_ptr + param, mask=c_mask, other=0.0)
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    grad = a[None, :] * dy - k[None, :] * ((x - hi[None, :]) - lo[None, :]) + c[None, :]
    tl.store(out_ptr + offsets, grad.to(out_ptr.dtype.element_ty), mask=mask)
