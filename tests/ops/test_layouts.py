"""Layouts: every CPU kernel (C++ and the default bodies) returns its outputs laid out as the
fake kernels say, ``torch.empty_like(input)``, whatever layouts its input and output gradient
come in. Inductor trusts the fake strides: the ops are ``flexible_layout``, so that it passes
them the channels-last activations its layout optimization makes, with no copy either way."""

import pytest
import torch

import bnfx  # noqa: F401

ghost_op = torch.ops.bnfx.ghost_batch_norm
sync_op = torch.ops.bnfx.sync_batch_norm


def layouts():
    x = torch.randn(8, 3, 4, 5) * 2 + 3
    return {
        "contiguous": x,
        "channels_last": x.to(memory_format=torch.channels_last),
        "transposed sequence": torch.randn(8, 20, 3).transpose(1, 2),  # [N, C, L] in [N, L, C] memory
        "sliced": torch.randn(8, 3, 4, 10)[..., ::2],  # not dense
        "channels_last_3d": torch.randn(8, 3, 2, 2, 5).to(memory_format=torch.channels_last_3d),
    }


def test_every_op_is_flexible_layout():
    for name in ("ghost_batch_norm", "ghost_batch_norm_backward", "sync_batch_norm", "sync_batch_norm_backward"):
        assert torch.Tag.flexible_layout in getattr(torch.ops.bnfx, name).default.tags


@pytest.mark.parametrize("group", [False, True], ids=["ghost", "sync"])
@pytest.mark.parametrize("layout", list(layouts()))
def test_outputs_are_laid_out_as_the_fake_kernels_say(group, layout, kernel, request):
    group_name = request.getfixturevalue("group_name") if group else None
    torch.manual_seed(0)
    x = layouts()[layout]
    weight, bias = torch.rand(3) + 0.5, torch.randn(3)
    # the output gradient in the other layout: mixed layouts reach the backward too
    grad = torch.randn(x.shape)
    grad = grad.to(memory_format=torch.channels_last) if layout == "contiguous" and x.dim() == 4 else grad

    def run(x, grad):
        x, w, b = (t.detach().requires_grad_() for t in (x, weight, bias))
        if group_name is None:
            out = ghost_op(x, w, b, None, None, None, 4, 0.1, 1e-5)[0]
        else:
            out = sync_op(x, w, b, None, None, None, 0.1, 1e-5, group_name)[0]
        (grad_input,) = torch.autograd.grad(out, x, grad)
        return out, grad_input

    out, grad_input = run(x, grad)
    expected = torch.empty_like(x).stride()
    assert out.stride() == expected and grad_input.stride() == expected
    ref_out, ref_grad = run(x.contiguous(), grad.contiguous())
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_input, ref_grad, rtol=1e-5, atol=1e-5)
