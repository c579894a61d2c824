"""The Triton launchers against float64 references written here, and the kernels' AOT compile.

Without a GPU the launchers run on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1,
set by tests/conftest.py before Triton is imported), so shapes stay small.
"""

import math
import os

import pytest
import torch

triton = pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU and TRITON_INTERPRET is not 1: the kernels cannot run", allow_module_level=True)

from bnfx.ops.triton import aot, launchers  # noqa: E402

# shape, chunk_size, memory format ("strided": a view that is neither layout)
CASES = [
    ((10, 3, 7, 7), 4, torch.contiguous_format),  # C=3, 7x7, uneven last chunk (4, 4, 2)
    ((10, 3, 7, 7), 4, torch.channels_last),
    ((6, 130), 4, torch.contiguous_format),  # [N, C], two channel blocks, uneven
    ((1, 5, 6, 6), 1, torch.contiguous_format),  # one sample
    ((5, 4, 9), 8, torch.contiguous_format),  # 3D, chunk larger than the batch
    ((5, 6, 9), 2, "channels_innermost"),  # 3D with C innermost: [5, 9, 6].transpose(1, 2)
    ((5, 4, 3, 2, 3), 2, torch.channels_last_3d),  # 5D
    ((4, 3, 2, 3, 5), 3, torch.contiguous_format),
    ((6, 3, 5, 8), 4, "strided"),
]
# reductions over several programs per (chunk, channel), with the split they get: 8 tiles of
# 2x1024 per chunk, split in 2, the last chunk's single tile leaving its second program
# empty; the same with tiles of 128x16 rows; 37 such tiles split in 9, whose partials are
# merged by the other merge tile
SPLIT_CASES = {
    ((17, 1, 32, 32), 16, torch.contiguous_format): 2,
    ((1025, 16), 1024, torch.contiguous_format): 2,
    ((4700, 3), 4700, torch.contiguous_format): 9,
}
CASES += list(SPLIT_CASES)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# output tolerance (relative, absolute per unit of the values) for results stored in x's dtype
STORED = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def make_input(shape, layout, dtype, scale=2.0, offset=3.0):
    def values(*size):
        return (torch.randn(size) * scale + offset).to(device=DEVICE, dtype=dtype)

    if layout == "channels_innermost":
        return values(shape[0], *shape[2:], shape[1]).movedim(-1, 1)
    if layout == "strided":
        return values(*shape[:-1], 2 * shape[-1])[..., ::2]
    return values(*shape).contiguous(memory_format=layout)


def per_element(per_chunk, x, chunk_size):
    """A ``[nchunks, C]`` tensor as ``[B, C, 1, ...]``, float64."""
    t = per_chunk.double()[torch.arange(x.shape[0], device=x.device) // chunk_size]
    return t.reshape(*t.shape, *[1] * (x.dim() - 2))


def chunks(x, chunk_size):
    """Each chunk of x as float64 ``[C, values]``."""
    return [c.double().transpose(0, 1).reshape(x.shape[1], -1) for c in x.split(chunk_size)]


def reference_moments(x, chunk_size):
    means, m2s = [], []
    for values in chunks(x, chunk_size):
        mean = values.mean(1)
        means.append(mean)
        m2s.append(((values - mean[:, None]) ** 2).sum(1))
    return torch.stack(means), torch.stack(m2s)


def parameters(x, chunk_size, generator_seed=1):
    nchunks = math.ceil(x.shape[0] / chunk_size)
    g = torch.Generator().manual_seed(generator_seed)
    mean = (torch.randn(nchunks, x.shape[1], generator=g, dtype=torch.float64) + 3).to(DEVICE)
    scale = (torch.rand(nchunks, x.shape[1], generator=g) + 0.5).to(DEVICE)
    return mean, scale


def assert_stored_close(actual, expected, dtype):
    tolerance = STORED[dtype]
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual.double(), expected, rtol=tolerance, atol=tolerance * scale)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape, chunk_size, layout", CASES, ids=str)
def test_moments(shape, chunk_size, layout, dtype):
    torch.manual_seed(0)
    x = make_input(shape, layout, dtype)
    mean, m2 = launchers.moments(x, chunk_size)
    ref_mean, ref_m2 = reference_moments(x, chunk_size)
    assert mean.dtype == m2.dtype == torch.float64
    assert mean.shape == (math.ceil(shape[0] / chunk_size), shape[1])
    # the statistics of the values as stored: as accurate for 16-bit inputs as for float32
    std = (ref_m2 / ref_m2.new_tensor([c.shape[1] for c in chunks(x, chunk_size)])[:, None]).sqrt()
    torch.testing.assert_close(mean, ref_mean, rtol=1e-6, atol=1e-6 * std.max().item())
    torch.testing.assert_close(m2, ref_m2, rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape, chunk_size, layout", CASES, ids=str)
def test_normalize(shape, chunk_size, layout, dtype):
    torch.manual_seed(0)
    x = make_input(shape, layout, dtype)
    mean, scale = parameters(x, chunk_size)
    shift = torch.randn(shape[1]).to(DEVICE)
    out = launchers.normalize(x, mean, scale, shift, chunk_size)
    expected = (x.double() - per_element(mean, x, chunk_size)) * per_element(scale, x, chunk_size)
    expected_shifted = expected + shift.double().reshape(-1, *[1] * (x.dim() - 2))
    assert out.dtype == dtype and out.shape == x.shape
    # x's layout, or contiguous where x had neither layout
    assert out.stride() == (x.contiguous().stride() if layout == "strided" else x.stride())
    assert_stored_close(out, expected_shifted, dtype)
    # shift None is 0; a float32 mean is taken as it is
    assert_stored_close(launchers.normalize(x, mean.float(), scale, None, chunk_size), expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape, chunk_size, layout", CASES, ids=str)
def test_backward_sums(shape, chunk_size, layout, dtype):
    torch.manual_seed(0)
    x = make_input(shape, layout, dtype)
    grad_out = torch.randn(shape).to(device=DEVICE, dtype=dtype)  # contiguous, whatever x is
    mean, _ = parameters(x, chunk_size)
    sum_dy, sum_dy_xmu = launchers.backward_sums(grad_out, x, mean, chunk_size)
    dy_xmu = grad_out.double() * (x.double() - per_element(mean, x, chunk_size))
    for actual, terms in ((sum_dy, grad_out.double()), (sum_dy_xmu, dy_xmu)):
        assert actual.dtype == torch.float32
        expected = torch.stack([t.sum(1) for t in chunks(terms, chunk_size)])
        magnitude = torch.stack([t.abs().sum(1) for t in chunks(terms, chunk_size)])
        # float32 sums: error bounded by the sum of magnitudes, not by the (cancelled) result
        assert ((actual.double() - expected).abs() <= 1e-6 * magnitude + 1e-30).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape, chunk_size, layout", CASES, ids=str)
def test_backward_input(shape, chunk_size, layout, dtype):
    torch.manual_seed(0)
    x = make_input(shape, layout, dtype)
    grad_out = make_input(shape, torch.contiguous_format, torch.float32, scale=1.0, offset=0.0)
    mean, a = parameters(x, chunk_size)
    k, c = torch.randn(2, *a.shape).to(DEVICE).unbind()
    grad_input = launchers.backward_input(grad_out, x, mean, a, k, c, chunk_size)
    dy = grad_out.to(dtype).double()  # grad_out is taken in x's dtype
    expected = (
        per_element(a, x, chunk_size) * dy
        - per_element(k, x, chunk_size) * (x.double() - per_element(mean, x, chunk_size))
        + per_element(c, x, chunk_size)
    )
    assert grad_input.dtype == dtype and grad_input.shape == x.shape
    assert grad_input.stride() == (x.contiguous().stride() if layout == "strided" else x.stride())
    assert_stored_close(grad_input, expected, dtype)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=str)
def test_empty_batch(memory_format):
    x = torch.empty(0, 4, 3, 3, device=DEVICE).contiguous(memory_format=memory_format)
    per_chunk = torch.zeros(1, 4, device=DEVICE)
    out = launchers.normalize(x, per_chunk, per_chunk, None, 2)
    grad = launchers.backward_input(x, x, per_chunk, per_chunk, per_chunk, per_chunk, 2)
    for result in (out, grad):
        assert result.shape == x.shape and result.dtype == x.dtype and result.stride() == x.stride()
    # an empty rank of a synchronized batch: sums of nothing, shaped like the mean
    sums = launchers.backward_sums(x, x, per_chunk, 0)
    assert all(torch.equal(s, torch.zeros(1, 4, device=DEVICE)) for s in sums)
    with pytest.raises(ValueError, match="at least one sample"):
        launchers.moments(x, 2)


def test_wrong_arguments_are_refused():
    x = torch.randn(5, 3, 2, device=DEVICE)
    mean, scale = parameters(x, 2)
    with pytest.raises(ValueError, match=r"mean must have shape \[nchunks, C\] = \[3, 3\], got \[2, 3\]"):
        launchers.normalize(x, mean[:2], scale, None, 2)
    with pytest.raises(ValueError, match="chunk_size must be a positive int, got 0"):
        launchers.moments(x, 0)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16, got torch.float64"):
        launchers.moments(x.double(), 2)


def test_cases_split_reductions_over_several_programs():
    # SPLIT_CASES exist to run the cross-program merges; keep them doing so
    for (shape, chunk_size, layout), expected in SPLIT_CASES.items():
        x = make_input(shape, layout, torch.float32)
        config = launchers.tile_config("cf" if x.dim() > 2 else "cl", shape[1], math.prod(shape[2:]))
        assert launchers._reduction_grid(config, x, chunk_size)[1] == expected, (shape, config)
    assert {launchers.merge_config(split) for split in SPLIT_CASES.values()} == set(launchers.all_merge_configs())


# ill-conditioned: mean / std = 1e6, where float32 sums of x, or of x * x, lose the variance
ILL_CONDITIONED = [((32, 4, 16, 16), torch.contiguous_format), ((32, 4, 16, 16), torch.channels_last), ((4096, 8), None)]


@pytest.mark.parametrize("shape, memory_format", ILL_CONDITIONED, ids=str)
def test_ill_conditioned_moments(shape, memory_format):
    torch.manual_seed(0)
    x = 1e4 + 1e-2 * torch.randn(shape)
    if memory_format is not None:
        x = x.contiguous(memory_format=memory_format)
    x = x.to(DEVICE)
    count = x.numel() // x.shape[1]
    ref_mean, ref_m2 = reference_moments(x, x.shape[0])
    mean, m2 = launchers.moments(x, x.shape[0])
    error = ((m2 - ref_m2) / ref_m2).abs().max().item()
    # torch's own batch norm on the same float32 data (CPU: 1e-4..1e1 relative error here)
    _, _, invstd = torch.ops.aten.native_batch_norm(x, None, None, None, None, True, 0.0, 0.0)
    torch_error = ((invstd.double() ** -2 * count - ref_m2[0]) / ref_m2[0]).abs().max().item()
    # measured under the interpreter: 4e-8 (NCHW) to 5e-7 (channels innermost, whose float32
    # column sums the interpreter adds sequentially); torch.var_mean, float64 inside, 3e-8
    assert error < 1e-6
    assert error < torch_error
    std = (ref_m2 / count).sqrt()
    assert ((mean - ref_mean).abs() <= 1e-6 * std).all()


@pytest.mark.parametrize("shape, memory_format", ILL_CONDITIONED, ids=str)
def test_ill_conditioned_centering(shape, memory_format):
    # (x - mean) * scale with a float64 mean: 1e-2 relative error if the mean were rounded
    # to float32 (its float32 rounding error, up to 5e-4, is 5% of the standard deviation)
    torch.manual_seed(0)
    x = 1e4 + 1e-2 * torch.randn(shape)
    if memory_format is not None:
        x = x.contiguous(memory_format=memory_format)
    x = x.to(DEVICE)
    ref_mean, ref_m2 = reference_moments(x, x.shape[0])
    invstd = (ref_m2 / (x.numel() // x.shape[1])).rsqrt()
    out = launchers.normalize(x, ref_mean, invstd.float(), None, x.shape[0])
    xmu = x.double() - per_element(ref_mean, x, x.shape[0])
    torch.testing.assert_close(out.double(), xmu * per_element(invstd, x, x.shape[0]), rtol=0, atol=1e-5)
    grad_out = torch.randn(shape, device=DEVICE)
    _, sum_dy_xmu = launchers.backward_sums(grad_out, x, ref_mean, x.shape[0])
    dims = [0, *range(2, x.dim())]
    expected = (grad_out.double() * xmu).sum(dims)
    magnitude = (grad_out.double() * xmu).abs().sum(dims)
    assert ((sum_dy_xmu[0].double() - expected).abs() <= 1e-6 * magnitude).all()
    ones = torch.ones_like(invstd, dtype=torch.float32)
    grad_input = launchers.backward_input(grad_out, x, ref_mean, 0 * ones, -ones, 0 * ones, x.shape[0])
    torch.testing.assert_close(grad_input.double(), xmu, rtol=0, atol=1e-2 * 1e-5)


def test_tile_configs_come_from_the_table():
    # the AOT compile covers exactly what tile_config can choose
    chosen = {
        launchers.tile_config(layout, channels, positions)
        for layout in launchers.LAYOUTS
        for channels in range(1, 300)
        for positions in (1, 2, 9, 16, 17, 49, 64, 100, 196, 400, 784, 1024, 1025, 3136)
    }
    assert chosen == set(launchers.all_tile_configs())
    assert {launchers.merge_config(split) for split in range(1, 5000)} == set(launchers.all_merge_configs())


TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}


def test_aot_compiles_what_the_launchers_launch():
    # every launch, merges included, has the argument types and constexprs of an AOT variant
    kernels = [*(k for by_layout in launchers.TILED_KERNELS.values() for k in by_layout.values())]
    kernels += launchers.MERGE_KERNELS
    launched = []

    def recorder(kernel):
        def record(*args, **kwargs):
            bound = {**dict(zip(kernel.arg_names, args)), **kwargs}
            launched.append((kernel.__name__, {name: bound[name] for name in kernel.arg_names}))

        return record

    hooks = [(kernel, recorder(kernel)) for kernel in kernels]
    for kernel, hook in hooks:
        kernel.add_pre_run_hook(hook)
    try:
        for (shape, chunk_size, layout), dtype in zip(SPLIT_CASES, DTYPES):
            x = make_input(shape, layout, dtype)
            mean, _ = launchers.moments(x, chunk_size)
            ones = torch.ones(mean.shape, device=DEVICE)
            out = launchers.normalize(x, mean, ones, None, chunk_size)
            launchers.backward_sums(out, x, mean, chunk_size)
            launchers.backward_input(out, x, mean, ones, ones, ones, chunk_size)
    finally:
        for kernel, hook in hooks:
            kernel.pre_run_hooks.remove(hook)

    variants = {(v.kernel.__name__, v.dtype, tuple(v.constexprs.items())): v for v in aot.variants()}
    assert {name for name, _ in launched} == {kernel.__name__ for kernel in kernels}
    for name, args in launched:
        signature = {
            arg: "constexpr" if arg.startswith("BLOCK_") else
            f"*{TRITON_TYPES[value.dtype]}" if isinstance(value, torch.Tensor) else "i32"
            for arg, value in args.items()
        }
        input_dtype = signature.get("x_ptr", "*-")[1:]
        constexprs = tuple((arg, args[arg]) for arg in ("BLOCK_ROWS", "BLOCK_COLS"))
        variant = variants[(name, input_dtype, constexprs)]
        assert aot._signature(variant) == signature, name


def test_aot_compiles_every_variant_for_sm80_and_sm90():
    rows = aot.compile_all(targets=(80, 90))
    failed = [row for row in rows if row.result != "ok"]
    assert not failed, failed
    kernels = len(launchers.TILED_KERNELS) * len(aot.INPUT_DTYPES) * len(launchers.all_tile_configs())
    kernels += len(launchers.MERGE_KERNELS) * len(launchers.all_merge_configs())
    assert len(rows) == 2 * kernels
    assert {row.target for row in rows} == {"sm_80", "sm_90"}
    assert all(0 < row.registers <= 255 and row.shared_memory >= 0 for row in rows)
