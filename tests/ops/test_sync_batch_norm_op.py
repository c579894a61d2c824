"""torch.ops.bnfx.sync_batch_norm on one rank: the local arithmetic against torch's batch norm.

The multi-process behaviour is tested in tests/test_sync_*.py.
"""

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.library import opcheck

import bnfx  # noqa: F401

op = torch.ops.bnfx.sync_batch_norm


SHAPES = [(6, 4), (5, 3, 7), (4, 3, 5, 6), (3, 2, 3, 4, 2)]


@pytest.mark.parametrize(
    "shape, dtype, channels_last, momentum",
    [(s, d, False, m) for s, d, m in itertools.product(SHAPES, [torch.float32, torch.float64], [0.1, None])]
    + [((4, 3, 5, 6), torch.float32, True, 0.1), ((4, 3, 5, 6), torch.bfloat16, False, 0.1)],
)
def test_one_rank_equals_torch_batch_norm(group_name, kernel_or_decomposition, shape, dtype, channels_last, momentum):
    torch.manual_seed(0)
    channels = shape[1]
    x = (torch.randn(shape, dtype=torch.float64) * 3 + 5).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    params = torch.float64 if dtype == torch.float64 else torch.float32
    weight, bias = torch.rand(channels, dtype=params) + 0.5, torch.randn(channels, dtype=params)
    mean, var, tracked = torch.randn(channels, dtype=params), torch.rand(channels, dtype=params) + 0.5, torch.tensor(3)
    given = [mean.clone(), var.clone(), tracked.clone()]
    dy = torch.randn(shape, dtype=torch.float64).to(dtype)

    ref_state = [mean.clone(), var.clone()]
    x_ref, w_ref, b_ref = (t.clone().requires_grad_() for t in (x, weight, bias))
    factor = 1.0 / 4 if momentum is None else momentum
    ref = F.batch_norm(x_ref, *ref_state, w_ref, b_ref, True, factor, 1e-5)
    ref.backward(dy)

    x_in, w_in, b_in = (t.clone().requires_grad_() for t in (x, weight, bias))
    out, new_mean, new_var, new_tracked, *_ = op(x_in, w_in, b_in, mean, var, tracked, momentum, 1e-5, group_name)
    out.backward(dy)
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else {}
    torch.testing.assert_close(out, ref, **tol)
    torch.testing.assert_close(x_in.grad, x_ref.grad, **tol)
    torch.testing.assert_close(w_in.grad, w_ref.grad, **tol)
    torch.testing.assert_close(b_in.grad, b_ref.grad, **tol)
    torch.testing.assert_close(new_mean, ref_state[0], **tol)
    torch.testing.assert_close(new_var, ref_state[1], **tol)
    assert new_tracked.item() == 4
    assert out.dtype == dtype
    if channels_last:
        assert out.is_contiguous(memory_format=torch.channels_last)
    for before, after in zip(given, (mean, var, tracked)):
        assert torch.equal(before, after)  # a functional op: the new state is returned


def test_no_affine_no_running_stats(group_name, kernel_or_decomposition):
    x = torch.randn(5, 3, 4, requires_grad=True)
    out, new_mean, new_var, new_tracked, *_ = op(x, None, None, None, None, None, 0.1, 1e-5, group_name)
    x_ref = x.detach().clone().requires_grad_()
    ref = F.batch_norm(x_ref, None, None, None, None, True, 0.1, 1e-5)
    torch.testing.assert_close(out, ref)
    out.square().sum().backward()
    ref.square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    assert new_mean.numel() == new_var.numel() == new_tracked.numel() == 0


def test_empty_group_batch_keeps_running_stats(group_name, kernel_or_decomposition):
    x = torch.randn(0, 3, 4, 4, requires_grad=True)
    mean, var = torch.randn(3), torch.rand(3)
    out, new_mean, new_var, new_tracked, *_ = op(x, torch.ones(3), None, mean, var, torch.tensor(0), 0.1, 1e-5, group_name)
    out.sum().backward()
    assert out.shape == x.shape and x.grad.shape == x.shape
    torch.testing.assert_close(new_mean, mean)
    torch.testing.assert_close(new_var, var)


def test_opcheck(group_name):
    x = torch.randn(6, 3, 4, 4, requires_grad=True)
    w, b = torch.rand(3, requires_grad=True), torch.randn(3, requires_grad=True)
    opcheck(op, (x, w, b, torch.zeros(3), torch.ones(3), torch.tensor(0), 0.1, 1e-5, group_name))
    opcheck(op, (x, None, None, None, None, None, None, 1e-5, group_name))
    opcheck(op, (x.detach().to(memory_format=torch.channels_last), w, b, torch.zeros(3), torch.ones(3), torch.tensor(0),
                 None, 1e-5, group_name))


def test_errors(group_name):
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        op(torch.randn(5), None, None, None, None, None, 0.1, 1e-5, group_name)
    with pytest.raises(ValueError, match="momentum=None .* needs num_batches_tracked"):
        op(torch.randn(4, 3), None, None, torch.zeros(3), torch.ones(3), None, None, 1e-5, group_name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_module_in_low_precision(group_name, dtype):
    # model.to(dtype): input, parameters and running statistics all in low precision
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(3).to(dtype)
    x = (torch.randn(4, 3, 5, 5) * 2 + 1).to(dtype).requires_grad_()
    out, new_mean, new_var, *_ = op(x, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.num_batches_tracked,
                                    0.1, 1e-5, group_name)
    out.sum().backward()
    x_ref = x.detach().float().requires_grad_()
    stats = [bn.running_mean.float(), bn.running_var.float()]
    ref = F.batch_norm(x_ref, *stats, bn.weight.float(), bn.bias.float(), True, 0.1, 1e-5)
    ref.sum().backward()
    assert out.dtype == new_mean.dtype == x.grad.dtype == bn.weight.grad.dtype == dtype
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(x.grad.float(), x_ref.grad, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(new_var.float(), stats[1], rtol=2e-2, atol=2e-2)
