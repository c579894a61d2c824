"""The ops' argument contract, called directly: every wrong size raises before a kernel reads
memory (C++ kernels and the default bodies alike, forward and backward ops), with torch's
exception types and the same message on every kernel."""

import pytest
import torch

import bnfx  # noqa: F401

C = 3


def _forward_args(op_name, group_name, **changes):
    args = dict(
        input=torch.randn(6, C, 4), weight=torch.ones(C), bias=torch.zeros(C), running_mean=torch.zeros(C),
        running_var=torch.ones(C), num_batches_tracked=torch.tensor(0), momentum=0.1, eps=1e-5,
    )
    args.update(changes)
    extra = {"ghost_batch_norm": {"ghost_batch_size": 4}, "sync_batch_norm": {"group_name": group_name}}[op_name]
    order = ["input", "weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    order += ["ghost_batch_size", "momentum", "eps"] if op_name == "ghost_batch_norm" else ["momentum", "eps", "group_name"]
    return [{**args, **extra}[name] for name in order]


WRONG_SIZES = [
    ("weight", torch.ones(C + 2), RuntimeError, "weight should contain 3 elements not 5"),
    ("bias", torch.zeros(C - 1), RuntimeError, "bias should contain 3 elements not 2"),
    ("running_mean", torch.zeros(C + 1), RuntimeError, "running_mean should contain 3 elements not 4"),
    ("running_var", torch.ones(1), RuntimeError, "running_var should contain 3 elements not 1"),
    ("eps", 0.0, ValueError, "batch_norm eps must be positive during training, but got 0"),
    ("eps", -1.0, ValueError, "batch_norm eps must be positive during training, but got -1"),
    ("input", torch.ones(6, C, 4, dtype=torch.int32), NotImplementedError, 'not implemented for torch.int32'),
    ("input", torch.randn(6, C, 4, dtype=torch.complex64), NotImplementedError, "not implemented for torch.complex64"),
    ("input", torch.randn(6, C, 4, dtype=torch.float64), RuntimeError, "mixed dtype: input is torch.float64"),
    ("weight", torch.ones(C, dtype=torch.float64), RuntimeError, "mixed dtype: input is torch.float32"),
]


@pytest.mark.parametrize("op_name", ["ghost_batch_norm", "sync_batch_norm"])
@pytest.mark.parametrize("name, value, error, message", WRONG_SIZES, ids=lambda v: v if isinstance(v, str) else "")
def test_forward_ops_refuse_what_torch_refuses(op_name, name, value, error, message, kernel, group_name):
    args = _forward_args(op_name, group_name, **{name: value})
    for requires_grad in (False, True):  # below autograd, and through the autograd kernel
        args[0] = args[0].detach().requires_grad_(requires_grad and args[0].is_floating_point())
        with pytest.raises(error, match=message):
            getattr(torch.ops.bnfx, op_name)(*args)


@pytest.mark.parametrize("op_name", ["ghost_batch_norm", "sync_batch_norm"])
def test_wrong_sizes_are_refused_under_fake_tensors_too(op_name, group_name):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        with pytest.raises(RuntimeError, match="weight should contain 3 elements not 5"):
            getattr(torch.ops.bnfx, op_name)(*_forward_args(op_name, group_name, weight=torch.ones(C + 2)))


def _backward_args(op_name, group_name, **changes):
    input = torch.randn(6, C, 4)
    if op_name == "ghost_batch_norm_backward":
        args = dict(grad_out=torch.randn(6, C, 4), input=input, weight=torch.ones(C), save_mean=torch.zeros(2, C),
                    save_invstd=torch.ones(2, C), ghost_batch_size=4, eps=1e-5)
    else:
        args = dict(grad_out=torch.randn(6, C, 4), input=input, weight=torch.ones(C), save_mean=torch.zeros(C),
                    save_var=torch.ones(C), count=torch.tensor([24.0], dtype=torch.float64), eps=1e-5,
                    group_name=group_name)
    args.update(changes)
    return list(args.values())


BACKWARD_WRONG = [
    ("grad_out", torch.randn(6, C, 2), "grad_out should have the input's shape \\(6, 3, 4\\), got \\(6, 3, 2\\)"),
    ("weight", torch.ones(C + 4), "weight should contain 3 elements not 7"),
    ("save_mean", None, "save_mean should have shape"),
]


@pytest.mark.parametrize("op_name", ["ghost_batch_norm_backward", "sync_batch_norm_backward"])
@pytest.mark.parametrize("name, value, message", BACKWARD_WRONG, ids=lambda v: v if isinstance(v, str) else "")
def test_backward_ops_check_their_tensors(op_name, name, value, message, kernel, group_name):
    if value is None:  # a saved statistic of another layout
        value = torch.zeros(1, C + 1) if op_name == "ghost_batch_norm_backward" else torch.zeros(C + 1)
    with pytest.raises(RuntimeError, match=message):
        getattr(torch.ops.bnfx, op_name)(*_backward_args(op_name, group_name, **{name: value}))


@pytest.mark.parametrize("shape", [(0, C, 4), (4, C, 0)], ids=["empty batch", "empty spatial"])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_empty_input_is_torchs(shape, momentum, kernel):
    """An empty input: an empty output, the statistics as they were, the batch counted (every
    ghost batch of an empty spatial input, as the chunk loop counts them), zero affine grads."""
    input = torch.randn(shape, requires_grad=True)
    weight, bias = torch.ones(C, requires_grad=True), torch.zeros(C, requires_grad=True)
    mean, var, tracked = torch.randn(C), torch.rand(C) + 0.5, torch.tensor(3)
    out, new_mean, new_var, new_tracked, *_ = torch.ops.bnfx.ghost_batch_norm(
        input, weight, bias, mean, var, tracked, 2, momentum, 1e-5
    )
    assert out.shape == input.shape
    assert torch.equal(new_mean, mean) and torch.equal(new_var, var)
    assert new_tracked.item() == 3 + max(1, -(-shape[0] // 2))
    out.backward(torch.randn(shape))
    assert input.grad.shape == shape
    assert torch.equal(weight.grad, torch.zeros(C)) and torch.equal(bias.grad, torch.zeros(C))
