"""The ops' CPU layers in C++ (csrc/ghost_batch_norm_cpu.cpp, sync_batch_norm_cpu.cpp): the
autograd kernel gives bit for bit what the op gives under a dispatch mode; the CPU kernels take
every CPU call (other layouts and dtypes too) with no Python kernel on the way, and raise the
Python op's errors."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import bnfx  # noqa: F401
from bnfx.ops import device_kernels
from bnfx.ops import ghost_batch_norm, sync_batch_norm

op = torch.ops.bnfx.ghost_batch_norm
sync_op = torch.ops.bnfx.sync_batch_norm


class Through(TorchDispatchMode):
    """Runs every op as it is, and records bnfx's: the autograd kernel's call below autograd
    passes through the mode."""

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
def test_autograd_kernel_equals_the_op_under_a_dispatch_mode(shape, g, momentum, affine, track, dtype):
    assert_cpp_path_equals_dispatched(shape, momentum, affine, track, dtype, g=g)


def assert_cpp_path_equals_dispatched(shape, momentum, affine, track, dtype, g=None, group_name=None):
    """The op called plainly and under a TorchDispatchMode: forward, new state and gradients
    bit for bit, and the mode sees the forward and backward ops."""
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


@pytest.mark.parametrize("group", [False, True], ids=["ghost", "sync"])
def test_the_cpu_kernels_take_other_layouts_and_dtypes(group, request):
    group_name = request.getfixturevalue("group_name") if group else None
    torch.manual_seed(0)
    x = torch.randn(8, 3, 4, 4) + 2
    weight, bias = torch.rand(3) + 0.5, torch.randn(3)
    grad = torch.randn(8, 3, 4, 4)
    layouts = (x.to(memory_format=torch.channels_last), x.transpose(2, 3), x.half(), x.bfloat16())
    for layout in layouts:
        expected = run(layout.float().contiguous(), weight, bias, (None, None, None), 4, 0.1, grad, group_name)
        got = run(layout, weight, bias, (None, None, None), 4, 0.1, grad.to(layout.dtype), group_name)
        # the output and the input gradient in the input's dtype and layout, as the default bodies give them
        for result in (got[0], got[-3]):
            assert result.dtype == layout.dtype and result.stride() == torch.empty_like(layout).stride()
        # float32 input rounded to the input dtype: float16 to 2^-11, bfloat16 to 2^-8 (outputs ~3)
        rtol = {torch.half: 2e-3, torch.bfloat16: 2e-2}.get(layout.dtype, 1e-5)
        for a, b in zip(expected, got):
            torch.testing.assert_close(b.to(a.dtype), a, rtol=rtol, atol=rtol * 4)


@pytest.mark.parametrize("group", [False, True], ids=["ghost", "sync"])
def test_channels_last_input_costs_no_copy(group, request):
    """Channels-last input ([B, C, S...] in [B, S..., C] memory: convolutions under inductor,
    channels_last models, transposed sequences) is read in place as [B S, C] rows."""
    group_name = request.getfixturevalue("group_name") if group else None
    torch.manual_seed(0)
    weight, bias = torch.rand(3) + 0.5, torch.randn(3)
    images = torch.randn(8, 3, 6, 6).to(memory_format=torch.channels_last)
    sequences = torch.randn(8, 12, 3).transpose(1, 2)
    for x in (images, sequences):
        grad = torch.randn_like(x)  # the same layout, as a backward gives it
        with torch.profiler.profile(record_shapes=True) as prof:
            got = run(x, weight, bias, (None, None, None), 4, 0.1, grad, group_name)
        copies = [
            (e.name, e.input_shapes) for e in prof.events()
            if e.name in ("aten::copy_", "aten::clone", "aten::contiguous") and list(x.shape) in e.input_shapes
        ]
        assert copies == []  # (per-channel statistics may be converted)
        assert got[0].stride() == got[-3].stride() == x.stride()
        expected = run(x.contiguous(), weight, bias, (None, None, None), 4, 0.1, grad.contiguous(), group_name)
        for a, b in zip(expected, got):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_default_bodies_turn_the_cpp_kernels_off():
    torch.manual_seed(0)
    x, weight, bias = torch.randn(16, 8) * 3 + 1, torch.rand(8) + 0.5, torch.randn(8)
    with device_kernels.default_bodies("cpu"):
        out = op(x.requires_grad_(), weight, bias, None, None, None, 4, 0.1, 1e-5)[0]
    assert torch.equal(out, ghost_batch_norm._LocalKernels.forward(x.detach(), weight, bias, 4, 1e-5)[0])
    # and on again after the block: the C++ kernel's rounding differs from the views'
    assert not torch.equal(op(x, weight, bias, None, None, None, 4, 0.1, 1e-5)[0], out)


@pytest.mark.parametrize(
    "args, message",
    [
        (dict(g=0), "ghost_batch_size must be a positive int, got 0"),
        (dict(eps=0.0), "batch_norm eps must be positive during training, but got 0"),
        (dict(x=torch.randn(5, 3), g=2), "ghost batch of 1 sample"),
        (dict(x=torch.randn(1, 3), g=2), "Expected more than 1 value per channel when training"),
        (dict(momentum=None, tracked=None), "momentum=None (cumulative average) needs num_batches_tracked"),
    ],
)
def test_refused_calls_raise_the_ops_errors(args, message):
    x = args.get("x", torch.randn(8, 3))
    state = (torch.zeros(3), torch.ones(3), args.get("tracked", torch.tensor(0)))
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        op(x.requires_grad_(), None, None, *state, args.get("g", 4), args.get("momentum", 0.1), args.get("eps", 1e-5))


def test_only_state_outputs_used_gives_no_gradient():
    x = torch.randn(8, 3, requires_grad=True)
    outputs = op(x, None, None, torch.zeros(3), torch.ones(3), torch.tensor(0), 4, 0.1, 1e-5)
    assert all(not t.requires_grad for t in outputs[1:])
    assert "GhostBatchNorm" in outputs[0].grad_fn.name()  # the C++ node
    torch.autograd.backward(outputs[0], torch.zeros(8, 3))
    assert torch.equal(x.grad, torch.zeros(8, 3))


@pytest.mark.parametrize("group", [False, True], ids=["ghost", "sync"])
def test_cpu_calls_run_no_python_kernel(group, request, monkeypatch):
    """The Python local work runs under default_bodies only: the CPU kernels are C++."""
    group_name = request.getfixturevalue("group_name") if group else None
    module = sync_batch_norm if group else ghost_batch_norm
    called = []
    for name in ("moments", "grad_sums") if group else ("forward", "backward"):
        original = getattr(module._LocalKernels, name)
        monkeypatch.setattr(module._LocalKernels, name, staticmethod(lambda *a, f=original: called.append(f) or f(*a)))
    x, grad = torch.randn(16, 8) * 3 + 1, torch.randn(16, 8)
    run(x, None, None, (None, None, None), 4, 0.1, grad, group_name)
    assert called == []
    with device_kernels.default_bodies("cpu"):
        run(x, None, None, (None, None, None), 4, 0.1, grad, group_name)
    assert len(called) == 2


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


def test_sync_refused_calls_raise_the_ops_errors(group_name):
    with pytest.raises(ValueError, match="momentum=None .* needs num_batches_tracked"):
        sync_op(torch.randn(4, 3, requires_grad=True), None, None, torch.zeros(3), torch.ones(3), None, None, 1e-5,
                group_name)
    with pytest.raises(Exception, match="no_such_group"):
        sync_op(torch.randn(4, 3, requires_grad=True), None, None, None, None, None, 0.1, 1e-5, "no_such_group")
