"""Statistics at least as accurate as torch's batch norm, on every kernel (and the ghost op's
inductor decomposition), on ill-conditioned input: float32 1e4 + 1e-2 randn (mean/std = 1e6),
where float32 sums lose the variance.

Errors are measured against float64 on the same float32 values: the output (max abs) and
the running variance (max relative; running stats start at 0 with momentum 1, so they hold
the batch's own variance). Every kernel must do no worse than torch's batch norm on the
same data, up to the rounding of its float32 result (2 units in the last place).
"""


import pytest
import torch
import torch.nn.functional as F

import bnfx  # noqa: F401
import kernel_workers
from bnfx.ops.ghost_batch_norm import ghost_batch_norm
from gloo_world import run_world

ULP = torch.finfo(torch.float32).eps


def ill_conditioned(shape):
    generator = torch.Generator().manual_seed(0)
    return (1e4 + 1e-2 * torch.randn(shape, generator=generator, dtype=torch.float64)).float()


def assert_no_worse_than_torch(errors: dict, torch_errors: dict) -> None:
    # a float32 result is off by up to half an ulp however it is computed
    assert errors["output"] <= torch_errors["output"] + 2 * ULP * 4, (errors, torch_errors)
    assert errors["running_var"] <= torch_errors["running_var"] + 2 * ULP, (errors, torch_errors)


@pytest.mark.parametrize("kernel", kernel_workers.KERNELS_AND_DECOMPOSITION + ("decomposition-indexed",))
@pytest.mark.parametrize(
    "shape,g,memory_format",
    [
        ((32, 4, 16, 16), 16, torch.contiguous_format),
        ((32, 4, 16, 16), 16, torch.channels_last),  # the C++ kernels read it as [B H W, C] rows
        ((32, 4, 5, 5), 8, torch.contiguous_format),
        ((256, 64), 32, torch.contiguous_format),
    ],
    ids=str,
)
def test_ghost(kernel, shape, g, memory_format):
    x = ill_conditioned(shape).to(memory_format=memory_format)
    zeros = torch.zeros(shape[1])
    out, _, new_var, *_ = kernel_workers.run_kernel(
        kernel, ghost_batch_norm, x, None, None, zeros, zeros.clone(), None, g, 1.0, 1e-5
    )
    assert_no_worse_than_torch(*ghost_errors(x, g, out, new_var))


def test_ghost_compiled_by_inductor():
    """What inductor generates from the decomposition (its own float32 Welford reductions),
    with a shorter last chunk: 30 samples in chunks of 8, 8, 8 and 6."""
    x = ill_conditioned((30, 4, 5, 5))
    layer = bnfx.convert(torch.nn.Sequential(torch.nn.BatchNorm2d(4, affine=False, momentum=1.0)), ghost_batch_size=8)
    layer[0].running_var.zero_()  # as ghost_errors' references start
    torch._dynamo.reset()
    out = torch.compile(layer, fullgraph=True)(x)
    assert_no_worse_than_torch(*ghost_errors(x, 8, out, layer[0].running_var))


def ghost_errors(x, g, out, new_var) -> tuple[dict, dict]:
    """Errors of a ghost result (running statistics from 0 with momentum 1) and of torch's batch
    norm on each chunk in float32."""
    channels, chunks = x.shape[1], x.chunk(-(-x.shape[0] // g))
    # Composer's running statistics: each chunk updates them with momentum 1 / nchunks, in
    # order; torch's batch norm per chunk does exactly that, in float32 and in float64
    exact_out = torch.cat([F.batch_norm(c.double(), None, None, training=True, eps=1e-5) for c in chunks])
    exact_var = torch.zeros(channels, dtype=torch.float64)
    torch_var = torch.zeros(channels)
    torch_outs = []
    for chunk in chunks:
        F.batch_norm(chunk.double(), torch.zeros_like(exact_var), exact_var, training=True, momentum=1.0 / len(chunks))
        torch_outs.append(
            F.batch_norm(chunk, torch.zeros(channels), torch_var, training=True, momentum=1.0 / len(chunks), eps=1e-5)
        )

    def errors(out, running_var):
        return {
            "output": (out.double() - exact_out).abs().max().item(),
            "running_var": ((running_var.double() - exact_var).abs() / exact_var).max().item(),
        }

    return errors(out, new_var), errors(torch.cat(torch_outs), torch_var)


@pytest.mark.parametrize("shape,sizes", [((4, 5, 5), (13, 19)), ((64,), (100, 156))])
def test_sync_on_two_ranks(shape, sizes):
    for result in run_world(kernel_workers.ill_conditioned_errors, 2, shape, list(sizes)):
        for kernel in kernel_workers.KERNELS_AND_DECOMPOSITION:
            assert_no_worse_than_torch(result[kernel], result["torch"])
