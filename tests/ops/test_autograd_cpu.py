"""The ops' C++ autograd kernels for CPU (csrc/ghost_autograd_cpu.cpp, sync_autograd_cpu.cpp):
where they compute in C++, they give bit for bit what the ops' registered kernels give through
the dispatcher; everything else reaches those kernels."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import bnfx  # noqa: F401
from bnfx.ops import device_kernels
from bnfx.ops.ghost_batch_norm import _forward_views, ghost_batch_norm
from bnfx.ops.sync_batch_norm import sync_batch_norm
from world_of_one import world_of_one

op = torch.ops.bnfx.ghost_batch_norm
sync_op = torch.ops.bnfx.sync_batch_norm


class Through(TorchDispatchMode):
    """Runs every op as it is, and records bnfx's: with a mode active, the autograd kernel
    sends the call below autograd to the registered kernels."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "bnfx":
            self.seen.append(func)
        return func(*args, **(kwargs or {}))


def run(x, weight, bias, state, g, momentum, grad, group_name=None):
    """Forward, backward; everything the caller can observe. ``group_name``: the sync op."""
    x = x.detach().requires_grad_()
    weight = None if weight is None else weight.detach().requires_grad_()
    bias = None if bias is None else bias.detach().requires_grad_()
    if group_name is None:
        outputs = op(x, weight, bias, *state, g, momentum, 1e-5)
    else:
        outputs = sync_op(x, weight, bias, *state, momentum, 1e-5, group_name)
    outputs[0].backward(grad)
    grads = [t.grad for t in (x, weight, bias) if t is not None]
    return [*outputs, *grads]


@pytest.mark.parametrize(
    "shape, g, momentum, affine, track, dtype",
    [
        ((13, 5), 5, 0.1, True, True, torch.float32),
        ((12, 3, 4, 4), 5, None, True, True, torch.float64),
        ((9, 4, 3), 2, 0.3, False, True, torch.float32),
        ((10, 6, 2, 2), 3, 0.1, True, False, torch.float32),
        ((7, 3, 2, 2, 2), 7, 0.1, True, True, torch.float64),
    ],
)
def test_cpp_path_equals_the_registered_kernels(shape, g, momentum, affine, track, dtype):
    assert_cpp_path_equals_dispatched(shape, momentum, affine, track, dtype, g=g)


def assert_cpp_path_equals_dispatched(shape, momentum, affine, track, dtype, g=None, group_name=None):
    """The op called plainly (the C++ path) and under a TorchDispatchMode (the registered
    kernels): forward, new state and gradients bit for bit."""
    torch.manual_seed(0)
    C = shape[1]
    x = torch.randn(shape, dtype=dtype) * 2 + 5
    weight = torch.rand(C, dtype=dtype) + 0.5 if affine else None
    bias = torch.randn(C, dtype=dtype) if affine else None
    grad = torch.randn(shape, dtype=dtype)
    initial = (torch.randn(C, dtype=dtype), torch.rand(C, dtype=dtype) + 0.5, torch.tensor(3))

    def state():
        return tuple(t.clone() for t in initial) if track else (None, None, None)

    direct = run(x, weight, bias, state(), g, momentum, grad, group_name)
    with Through() as mode:
        dispatched = run(x, weight, bias, state(), g, momentum, grad, group_name)
    called = sync_op if group_name else op
    backward = torch.ops.bnfx.sync_batch_norm_backward if group_name else torch.ops.bnfx.ghost_batch_norm_backward
    assert mode.seen == [called.default, backward.default]
    for a, b in zip(direct, dispatched, strict=True):  # bit for bit (an empty batch's variance is nan)
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def test_inputs_the_cpp_kernels_do_not_take_reach_the_registered_kernels():
    torch.manual_seed(0)
    x = torch.randn(8, 3, 4, 4) + 2
    weight, bias = torch.rand(3) + 0.5, torch.randn(3)
    grad = torch.randn(8, 3, 4, 4)
    for layout in (x.to(memory_format=torch.channels_last), x.transpose(2, 3), x.half()):
        expected = run(layout.float().contiguous(), weight, bias, (None, None, None), 4, 0.1, grad)
        got = run(layout, weight, bias, (None, None, None), 4, 0.1, grad.to(layout.dtype))
        rtol = 1e-2 if layout.dtype == torch.half else 1e-5
        for a, b in zip(expected, got):
            torch.testing.assert_close(b.float(), a, rtol=rtol, atol=rtol)


def test_default_bodies_turn_the_cpp_path_off():
    torch.manual_seed(0)
    x, weight, bias = torch.randn(16, 8) * 3 + 1, torch.rand(8) + 0.5, torch.randn(8)
    with device_kernels.default_bodies("cpu"):
        out = op(x, weight, bias, None, None, None, 4, 0.1, 1e-5)[0]
    assert torch.equal(out, _forward_views(x, weight, bias, 4, 1e-5)[0])
    # and on again after the block: the C++ kernel's rounding differs from the views'
    assert not torch.equal(op(x, weight, bias, None, None, None, 4, 0.1, 1e-5)[0], out)


@pytest.mark.parametrize(
    "args, message",
    [
        (dict(g=0), "ghost_batch_size must be a positive int, got 0"),
        (dict(x=torch.randn(0, 3)), "non-empty batch"),
        (dict(x=torch.randn(5, 3), g=2), "ghost batch of 1 sample"),
        (dict(momentum=None, tracked=None), "momentum=None (cumulative average) needs num_batches_tracked"),
    ],
)
def test_refused_calls_raise_the_ops_errors(args, message):
    x = args.get("x", torch.randn(8, 3))
    state = (torch.zeros(3), torch.ones(3), args.get("tracked", torch.tensor(0)))
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        op(x.requires_grad_(), None, None, *state, args.get("g", 4), args.get("momentum", 0.1), 1e-5)


def test_only_state_outputs_used_gives_no_gradient():
    x = torch.randn(8, 3, requires_grad=True)
    outputs = op(x, None, None, torch.zeros(3), torch.ones(3), torch.tensor(0), 4, 0.1, 1e-5)
    assert all(not t.requires_grad for t in outputs[1:])
    assert "GhostBatchNorm" in outputs[0].grad_fn.name()  # the C++ node
    torch.autograd.backward(outputs[0], torch.zeros(8, 3))
    assert torch.equal(x.grad, torch.zeros(8, 3))


def test_plain_calls_compute_in_cpp_without_the_registered_kernels():
    torch.manual_seed(0)
    x, weight, bias = torch.randn(16, 8) * 3 + 1, torch.rand(8) + 0.5, torch.randn(8)
    expected = device_kernels.cpu_extension().forward(x, weight, bias, 4, 1e-5)[0]
    # with the Python CPU kernel off, only the C++ autograd kernel can give the C++ kernel's output
    with ghost_batch_norm.set_kernel_enabled("cpu", False):
        out = op(x.requires_grad_(), weight, bias, None, None, None, 4, 0.1, 1e-5)[0]
        assert not torch.equal(_forward_views(x.detach(), weight, bias, 4, 1e-5)[0], expected)
    assert torch.equal(out, expected)


@pytest.fixture(scope="module")
def group_name():
    with world_of_one() as group:
        yield group.group_name


@pytest.mark.parametrize(
    "shape, momentum, affine, track, dtype",
    [
        ((13, 5), 0.1, True, True, torch.float32),
        ((12, 3, 4, 4), None, True, True, torch.float64),
        ((9, 4, 3), 0.3, False, True, torch.float32),
        ((10, 6, 2, 2), 0.1, True, False, torch.float32),
        ((0, 3, 2, 2), 0.1, True, True, torch.float32),
    ],
)
def test_sync_cpp_path_equals_the_registered_kernels(group_name, shape, momentum, affine, track, dtype):
    assert_cpp_path_equals_dispatched(shape, momentum, affine, track, dtype, group_name=group_name)


def test_sync_plain_calls_compute_in_cpp_without_the_registered_kernels(group_name):
    torch.manual_seed(0)
    x, weight, bias = torch.randn(16, 8) * 3 + 1, torch.rand(8) + 0.5, torch.randn(8)
    with device_kernels.default_bodies("cpu"):
        views = sync_op(x, weight, bias, None, None, None, 0.1, 1e-5, group_name)[0]
    registered = sync_op(x, weight, bias, None, None, None, 0.1, 1e-5, group_name)[0]
    with sync_batch_norm.set_kernel_enabled("cpu", False):  # only the C++ autograd kernel gives C++ results
        direct = sync_op(x.requires_grad_(), weight, bias, None, None, None, 0.1, 1e-5, group_name)[0]
    assert not torch.equal(views, registered) and torch.equal(direct, registered)


def test_sync_refused_calls_raise_the_ops_errors(group_name):
    with pytest.raises(ValueError, match="momentum=None .* needs num_batches_tracked"):
        sync_op(torch.randn(4, 3, requires_grad=True), None, None, torch.zeros(3), torch.ones(3), None, None, 1e-5,
                group_name)
    with pytest.raises(Exception, match="no_such_group"):
        sync_op(torch.randn(4, 3, requires_grad=True), None, None, None, None, None, 0.1, 1e-5, "no_such_group")
