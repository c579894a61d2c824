import contextlib
import itertools
import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch.library import opcheck

import bnfx  # noqa: F401
from bnfx.chunk_loop import ghost_chunk_loop
from bnfx.ops import device_kernels, ghost_chunk_layout

op = torch.ops.bnfx.ghost_batch_norm


def test_fused_cpu_kernel_is_built():
    # setup.py builds it as optional; the suite insists, so a broken build does not go unseen
    library = device_kernels.cpu_kernels()
    assert library is not None
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        assert library == "_cpu_kernels_avx2"
    for name in ("ghost_batch_norm", "ghost_batch_norm_backward", "sync_batch_norm", "sync_batch_norm_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"bnfx::{name}", "CPU")
    for name in ("ghost_batch_norm", "sync_batch_norm"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"bnfx::{name}", "AutogradCPU")


def test_layout_matches_torch_chunk():
    for batch, g in itertools.product(range(1, 130), range(1, 40)):
        sizes = [c.shape[0] for c in torch.empty(batch).chunk(math.ceil(batch / g))]
        size, equal, last = ghost_chunk_layout(batch, g)
        assert [size] * equal + ([last] if last else []) == sizes, (batch, g)
        assert len(sizes) == math.ceil(batch / g)


CASES = [
    # shape, ghost size, momentum, affine, track
    ((100, 6, 5, 5), 32, 0.1, True, True),
    ((70, 6), 32, 0.1, True, True),
    ((70, 6, 9), 32, None, True, True),
    ((10, 3, 4), 3, 0.3, True, True),
    ((9, 4, 3, 3, 3), 4, None, True, True),
    ((64, 5, 4, 4), 16, 0.1, False, True),
    ((50, 5, 4, 4), 16, 0.1, True, False),
    ((20, 5), 32, 0.1, True, True),  # batch smaller than the ghost size: one chunk
]


@pytest.mark.parametrize("shape,g,momentum,affine,track", CASES)
def test_matches_chunk_loop(shape, g, momentum, affine, track, kernel_or_decomposition):
    torch.manual_seed(0)
    C = shape[1]
    x = (torch.randn(shape, dtype=torch.float64) * 3 + 1).requires_grad_()
    weight = torch.randn(C, dtype=torch.float64, requires_grad=True) if affine else None
    bias = torch.randn(C, dtype=torch.float64, requires_grad=True) if affine else None
    mean = torch.randn(C, dtype=torch.float64) if track else None
    var = torch.rand(C, dtype=torch.float64) + 0.5 if track else None
    tracked = torch.tensor(5) if track else None
    grad = torch.randn(shape, dtype=torch.float64)

    ref_state = [t.clone() if t is not None else None for t in (mean, var, tracked)]
    ref_out = ghost_chunk_loop(x, weight, bias, *ref_state, g, momentum, 1e-5)
    ref_grads = torch.autograd.grad(ref_out, [t for t in (x, weight, bias) if t is not None], grad)

    out, new_mean, new_var, new_tracked, save_mean, save_invstd = op(x, weight, bias, mean, var, tracked, g, momentum, 1e-5)
    grads = torch.autograd.grad(out, [t for t in (x, weight, bias) if t is not None], grad)

    torch.testing.assert_close(out, ref_out)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want)
    assert save_mean.shape == (math.ceil(shape[0] / g), C)
    if track:
        torch.testing.assert_close(new_mean, ref_state[0])
        torch.testing.assert_close(new_var, ref_state[1])
        assert new_tracked.item() == ref_state[2].item() == 5 + math.ceil(shape[0] / g)
        assert tracked.item() == 5  # functional: inputs untouched
    else:
        assert new_mean.numel() == new_var.numel() == new_tracked.numel() == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_matches_chunk_loop(dtype, kernel_or_decomposition):
    torch.manual_seed(0)
    x = torch.randn(40, 8, 6, 6).to(dtype)
    weight, bias = torch.randn(8), torch.randn(8)
    mean, var = torch.zeros(8), torch.ones(8)
    ref_mean, ref_var = mean.clone(), var.clone()
    ref = ghost_chunk_loop(x, weight, bias, ref_mean, ref_var, None, 16, 0.1, 1e-5)
    out, new_mean, new_var, *_ = op(x, weight, bias, mean, var, None, 16, 0.1, 1e-5)
    assert out.dtype == dtype and new_mean.dtype == torch.float32
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(new_mean, ref_mean, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(new_var, ref_var, atol=1e-3, rtol=1e-3)


def test_channels_last_keeps_layout_and_values(kernel_or_decomposition):
    x = torch.randn(48, 8, 5, 5).to(memory_format=torch.channels_last).requires_grad_()
    w, b = torch.randn(8, requires_grad=True), torch.randn(8, requires_grad=True)
    out = op(x, w, b, None, None, None, 16, 0.1, 1e-5)[0]
    assert out.is_contiguous(memory_format=torch.channels_last)
    ref = ghost_chunk_loop(x.contiguous(), w, b, None, None, None, 16, 0.1, 1e-5)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    torch.testing.assert_close(torch.autograd.grad(out, x, g)[0], torch.autograd.grad(ref, x, g)[0])


@pytest.mark.parametrize(
    "args",
    [
        (torch.randn(20, 4, 3, 3), torch.randn(4), torch.randn(4), torch.zeros(4), torch.ones(4), torch.tensor(0), 8, 0.1, 1e-5),
        (torch.randn(21, 4), None, None, None, None, None, 8, None, 1e-5),
        (torch.randn(20, 4, 7), torch.randn(4), None, torch.zeros(4), torch.ones(4), torch.tensor(3), 5, None, 1e-3),
    ],
)
def test_opcheck(args, kernel):
    args = list(args)
    args[0].requires_grad_()
    if args[1] is not None:
        args[1].requires_grad_()
    opcheck(op.default, tuple(args))


def test_errors_name_the_parameter():
    x = torch.randn(8, 4)
    with pytest.raises(ValueError, match="ghost_batch_size must be a positive int, got 0"):
        op(x, None, None, None, None, None, 0, 0.1, 1e-5)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        op(torch.randn(10, 3), None, None, None, None, None, 3, 0.1, 1e-5)  # chunks 3, 3, 3, 1
    with pytest.raises(ValueError, match="num_batches_tracked"):
        op(x, None, None, torch.zeros(4), torch.ones(4), None, 4, None, 1e-5)


def test_state_outputs_are_not_differentiable():
    x = torch.randn(16, 3, requires_grad=True)
    out, new_mean, new_var, new_tracked, save_mean, save_invstd = op(
        x, None, None, torch.zeros(3), torch.ones(3), torch.tensor(0), 4, 0.1, 1e-5
    )
    assert out.requires_grad
    assert not any(t.requires_grad for t in (new_mean, new_var, new_tracked, save_mean, save_invstd))


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(2, 40),
    g=st.integers(1, 45),
    channels=st.integers(1, 5),
    spatial=st.sampled_from([(), (1,), (3,), (2, 3)]),
    momentum=st.sampled_from([0.1, 0.9, None]),
    fused=st.booleans(),
)
def test_property_matches_chunk_loop(batch, g, channels, spatial, momentum, fused):
    shape = (batch, channels, *spatial)
    size, _, last = ghost_chunk_layout(batch, g)
    assume((last or size) * math.prod(spatial) > 1)  # torch refuses a 1-value batch too
    torch.manual_seed(batch * 1000 + g)
    x = torch.randn(shape, dtype=torch.float64) * 2 + 3
    weight, bias = torch.randn(channels, dtype=torch.float64), torch.randn(channels, dtype=torch.float64)
    mean, var, tracked = torch.randn(channels, dtype=torch.float64), torch.rand(channels, dtype=torch.float64), torch.tensor(4)
    ref_state = [mean.clone(), var.clone(), tracked.clone()]
    ref = ghost_chunk_loop(x, weight, bias, *ref_state, g, momentum, 1e-5)
    with contextlib.nullcontext() if fused else device_kernels.default_bodies("cpu"):
        out, new_mean, new_var, new_tracked, *_ = op(x, weight, bias, mean, var, tracked, g, momentum, 1e-5)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(new_mean, ref_state[0])
    torch.testing.assert_close(new_var, ref_state[1])
    assert new_tracked.item() == ref_state[2].item()
