"""What each rank of the sync kernel tests runs (spawned processes import this module by name):
each sync kernel (the C++ CPU one, the default body, the Triton one registered for CUDA)
on this rank's share of one batch."""

from __future__ import annotations

import contextlib
from unittest import mock

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import bnfx  # noqa: F401
from bnfx.ops import DECOMPOSITIONS, device_kernels, ghost_batch_norm
from bnfx.ops.sync_batch_norm import sync_batch_norm, sync_batch_norm_backward

KERNELS = ("cpu-extension", "default", "triton")
KERNELS_AND_DECOMPOSITION = KERNELS + ("decomposition",)  # and what inductor compiles


def _share(t: torch.Tensor, sizes: list[int], rank: int) -> torch.Tensor:
    start = sum(sizes[:rank])
    return t[start : start + sizes[rank]]


def _with_layout(t: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return t.to(memory_format=torch.channels_last) if channels_last else t.contiguous()


def low_precision_bound(dtype: torch.dtype, torch_error: float, exact: torch.Tensor) -> float:
    """How far a kernel's reduced-precision result may be from the float32 one: twice torch's
    own error in that dtype, or, in Triton's interpreter, which truncates float32 to bf16
    where GPUs round to nearest, one unit in the last place of the largest value."""
    bound = 2 * torch_error
    if dtype == torch.bfloat16 and not torch.cuda.is_available():
        bound = max(bound, torch.finfo(dtype).eps * exact.abs().max().item())
    return bound


def run_cuda_kernel(op_def, *args):
    """``op_def``'s CUDA kernel on ``args`` (CPU tensors), results on the CPU: through the op on
    a GPU, else the registered function itself, in Triton's interpreter."""
    if torch.cuda.is_available():
        moved = [a.cuda() if isinstance(a, torch.Tensor) else a for a in args]
        return tuple(t.cpu() for t in op_def(*moved))
    kernel = device_kernels.registered_kernel(op_def, "cuda")
    assert kernel is not None, "no CUDA kernel registered: Triton did not import"
    return kernel(*args)


class Decomposed(TorchDispatchMode):
    """Runs each bnfx op that has one as its decomposition (what inductor compiles), eagerly:
    the form for a shape known when compiling, or with ``indexed`` the ghost op's form for a
    symbolic batch size (``dynamic=True``)."""

    def __init__(self, indexed: bool = False) -> None:
        super().__init__()
        self.symbolic = mock.patch.object(ghost_batch_norm, "_shape_known", lambda input: False) if indexed else None

    def __enter__(self):
        if self.symbolic is not None:
            self.symbolic.start()
        return super().__enter__()

    def __exit__(self, *exc_info):
        if self.symbolic is not None:
            self.symbolic.stop()
        return super().__exit__(*exc_info)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return DECOMPOSITIONS.get(func, func)(*args, **(kwargs or {}))


def run_kernel(kernel: str, op_def, *args):
    """``op_def`` through one of ``KERNELS``, on CPU tensors, or through its "decomposition"."""
    if kernel == "triton":
        return run_cuda_kernel(op_def, *args)
    contexts = {
        "default": lambda: device_kernels.default_bodies("cpu"),
        "decomposition": Decomposed,
        "decomposition-indexed": lambda: Decomposed(indexed=True),
    }
    with contexts.get(kernel, contextlib.nullcontext)():
        return op_def(*args)


def _run(kernel: str, direction: str, *args):
    """One direction of the sync op through ``kernel``."""
    return run_kernel(kernel, {"forward": sync_batch_norm, "backward": sync_batch_norm_backward}[direction], *args)


def triton_matches_cpu_op(rank: int, world_size: int, sizes, shape, dtype, channels_last) -> None:
    """The CUDA kernel against the CPU op on the same shares: every output, both directions."""
    generator = torch.Generator().manual_seed(3)
    channels = shape[0]
    x_all = (torch.randn(sum(sizes), *shape, generator=generator) * 2 + 3).to(dtype)
    dy_all = torch.randn(sum(sizes), *shape, generator=generator).to(dtype)
    weight, bias = torch.rand(channels, generator=generator) + 0.5, torch.randn(channels, generator=generator)
    state = [torch.randn(channels, generator=generator), torch.rand(channels, generator=generator) + 0.5, torch.tensor(4)]
    x = _with_layout(_share(x_all, sizes, rank), channels_last)
    dy = _share(dy_all, sizes, rank)
    group = dist.group.WORLD.group_name
    # the CPU reference sees the same values in float32 (bf16 -> fp32 is exact)
    reference_x = x.float()
    got = _run("triton", "forward", x, weight, bias, *state, 0.1, 1e-5, group)
    want = _run("cpu-extension", "forward", reference_x, weight, bias, *state, 0.1, 1e-5, group)
    assert got[0].dtype == dtype and got[0].stride() == x.stride()
    for g, w in zip(got[1:], want[1:]):  # statistics: float32 from the same values
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    # the saved statistics, not the chain's link (the last output)
    got_grads = _run("triton", "backward", dy, x, weight, *got[4:7], 1e-5, group)
    want_grads = _run("cpu-extension", "backward", dy.float(), reference_x, weight, *want[4:7], 1e-5, group)
    assert got_grads[0].dtype == dtype
    for g, w in zip(got_grads[1:], want_grads[1:]):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)
    if dtype == torch.float32:
        torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got_grads[0], want_grads[0], atol=1e-5, rtol=1e-5)
        return
    # reduced precision: within twice what torch's own batch norm in that dtype achieves on
    # the concatenated batch
    x_low = x_all.clone().requires_grad_()
    torch_out = F.batch_norm(x_low, None, None, weight.to(dtype), bias.to(dtype), training=True, eps=1e-5)
    (torch_grad,) = torch.autograd.grad(torch_out, x_low, dy_all)
    for ours, theirs, exact in ((got[0], torch_out, want[0]), (got_grads[0], torch_grad, want_grads[0])):
        torch_error = (_share(theirs, sizes, rank).float() - exact).abs().max().item()
        our_error = (ours.float() - exact).abs().max().item()
        assert our_error <= low_precision_bound(dtype, torch_error, exact), (our_error, torch_error)


def ill_conditioned_errors(rank: int, world_size: int, shape, sizes) -> dict[str, dict[str, float]]:
    """Errors against float64 of each kernel and of torch's batch norm on the concatenated
    batch, for 1e4 + 1e-2 randn in float32: output (max abs over this rank's rows) and running variance (max
    relative, momentum 1: the batch's own unbiased variance)."""
    generator = torch.Generator().manual_seed(11)
    x_all = (1e4 + 1e-2 * torch.randn(sum(sizes), *shape, generator=generator, dtype=torch.float64)).float()
    channels = shape[0]
    exact_x = x_all.double()
    exact_var = exact_x.transpose(0, 1).reshape(channels, -1).var(1)
    exact_out = F.batch_norm(exact_x, None, None, training=True, eps=1e-5)

    def errors(out, running_var, rows=slice(None)):
        return {
            "output": (out.double() - exact_out[rows]).abs().max().item(),
            "running_var": ((running_var.double() - exact_var).abs() / exact_var).max().item(),
        }

    torch_var = torch.zeros(channels)
    torch_out = F.batch_norm(x_all, torch.zeros(channels), torch_var, training=True, momentum=1.0, eps=1e-5)
    result = {"torch": errors(torch_out, torch_var)}
    x = _share(x_all, sizes, rank)
    group = dist.group.WORLD.group_name
    for kernel in KERNELS_AND_DECOMPOSITION:
        out, _, new_var, *_ = _run(kernel, "forward", x, None, None, torch.zeros(channels), torch.zeros(channels),
                                   None, 1.0, 1e-5, group)
        start = sum(sizes[:rank])
        result[kernel] = errors(out, new_var, slice(start, start + sizes[rank]))  # this rank's rows
    return result


def nccl_sync_matches_one_process(rank: int, world_size: int, sizes) -> None:
    """A sync-transformed module on GPU ``rank``, synchronized over NCCL, against torch's batch
    norm on the concatenated batch on the CPU."""
    torch.cuda.set_device(rank)
    group = dist.new_group(backend="nccl")
    generator = torch.Generator().manual_seed(5)
    x_all = torch.randn(sum(sizes), 4, 6, 6, generator=generator) * 2 + 1
    dy_all = torch.randn(sum(sizes), 4, 6, 6, generator=generator)
    reference = torch.nn.BatchNorm2d(4)
    x_ref = x_all.clone().requires_grad_()
    reference(x_ref).backward(dy_all)
    model = bnfx.transform(torch.nn.Sequential(torch.nn.BatchNorm2d(4)).cuda(), sync=group)
    x = _share(x_all, sizes, rank).cuda().requires_grad_()
    model(x).backward(_share(dy_all, sizes, rank).cuda())
    torch.testing.assert_close(x.grad.cpu(), _share(x_ref.grad, sizes, rank), atol=1e-4, rtol=1e-4)
    for mine, want in ((model[0].running_mean, reference.running_mean), (model[0].running_var, reference.running_var)):
        torch.testing.assert_close(mine.cpu(), want, atol=1e-5, rtol=1e-5)
    weight_grad = model[0].weight.grad.clone()
    dist.all_reduce(weight_grad, group=group)  # data parallelism sums the ranks' shares
    torch.testing.assert_close(weight_grad.cpu(), reference.weight.grad, atol=1e-4, rtol=1e-4)


def low_precision_errors(rank: int, world_size: int, dtype, sizes) -> dict[str, dict[str, float]]:
    """Errors against float64 of each sync kernel and of torch's batch norm (its mixed-dtype
    kernel) on the concatenated ``dtype`` batch with float32 parameters: output and input
    gradient (max abs over this rank's rows), running variance (max relative, momentum 1)."""
    generator = torch.Generator().manual_seed(12)
    channels = 4
    x_all = (torch.randn(sum(sizes), channels, 5, 5, generator=generator) * 3 + 2).to(dtype)
    dy_all = torch.randn(x_all.shape, generator=generator).to(dtype)
    weight, bias = torch.rand(channels, generator=generator) + 0.5, torch.randn(channels, generator=generator)
    rows = _share(torch.arange(sum(sizes)), sizes, rank)

    def reference(x, params_dtype):
        x = x.clone().requires_grad_()
        running_var = torch.zeros(channels, dtype=params_dtype)
        out = F.batch_norm(x, torch.zeros_like(running_var), running_var, weight.to(params_dtype),
                           bias.to(params_dtype), training=True, momentum=1.0, eps=1e-5)
        (grad,) = torch.autograd.grad(out, x, dy_all.to(x.dtype))
        return out.detach()[rows], grad[rows], running_var

    exact_out, exact_grad, exact_var = reference(x_all.double(), torch.float64)

    def errors(out, grad, running_var):
        return {
            "output": (out.double() - exact_out).abs().max().item(),
            "grad": (grad.double() - exact_grad).abs().max().item(),
            "running_var": ((running_var.double() - exact_var).abs() / exact_var).max().item(),
        }

    theirs = errors(*reference(x_all, torch.float32))
    result = {"torch": theirs, "bounds": {
        "output": low_precision_bound(dtype, theirs["output"], exact_out),
        "grad": low_precision_bound(dtype, theirs["grad"], exact_grad),
    }}
    x, dy = x_all[rows], dy_all[rows]
    group = dist.group.WORLD.group_name
    for kernel in KERNELS_AND_DECOMPOSITION:
        zeros = torch.zeros(channels)
        out, _, running_var, _, *saved, _link = _run(kernel, "forward", x, weight, bias, zeros, zeros.clone(), None,
                                                     1.0, 1e-5, group)
        grad, *_ = _run(kernel, "backward", dy, x, weight, *saved, 1e-5, group)
        result[kernel] = errors(out, grad, running_var)
    return result
