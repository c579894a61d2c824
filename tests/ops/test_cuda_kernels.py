"""The kernels bnfx registers for CUDA (Triton), against the CPU op.

Without a GPU, Triton's interpreter runs them on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1) and the tests call the registered functions directly; with a GPU, the
ops run on CUDA tensors and the dispatcher picks the same functions.
"""

import copy
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import bnfx  # noqa: F401
import kernel_workers
from bnfx.chunk_loop import ghost_chunk_loop
from bnfx.ops.ghost_batch_norm import ghost_batch_norm, ghost_batch_norm_backward
from gloo_world import run_world

ON_GPU = torch.cuda.is_available()
OPS = ("ghost_batch_norm", "ghost_batch_norm_backward", "sync_batch_norm", "sync_batch_norm_backward")


def test_every_op_has_a_cuda_kernel():
    for name in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"bnfx::{name}", "CUDA"), name


def test_import_without_triton_runs_the_generic_path():
    # Triton made unimportable: bnfx imports, says so once, registers no CUDA kernel
    code = (
        "import sys, logging; sys.modules['triton'] = None; logging.basicConfig(level=logging.INFO)\n"
        "import torch, bnfx\n"
        "print(torch._C._dispatch_has_kernel_for_dispatch_key('bnfx::ghost_batch_norm', 'CUDA'))\n"
        "x = torch.randn(8, 3); print(tuple(bnfx.functional.ghost_batch_norm(x, None, None, ghost_batch_size=4).shape))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "(8,", "3)"], done.stdout
    assert done.stderr.count("Triton is not available") == 1, done.stderr


GHOST_CASES = [
    # shape, ghost size, channels_last
    ((10, 3, 7, 7), 4, False),  # C=3, 7x7, chunks 4, 4, 2
    ((10, 3, 7, 7), 4, True),
    ((6, 130), 4, False),  # C=130, [N, C]
    ((1, 5, 3, 3), 4, False),  # B=1 with spatial size, ghost size > batch
    ((12, 6, 5), 5, False),  # 3D, chunks 4, 4, 4
    ((9, 4, 3, 3, 3), 4, False),  # 5D
    ((8, 4, 2, 3, 3), 3, True),  # channels_last_3d, uneven
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _layout(t, channels_last):
    if not channels_last:
        return t.contiguous()
    return t.to(memory_format=torch.channels_last if t.dim() == 4 else torch.channels_last_3d)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,g,channels_last", GHOST_CASES)
def test_ghost_kernel_matches_cpu_op(shape, g, channels_last, dtype):
    torch.manual_seed(0)
    channels = shape[1]
    x = _layout((torch.randn(shape) * 2 + 3).to(dtype), channels_last)
    dy = torch.randn(shape).to(dtype)
    weight, bias = torch.rand(channels) + 0.5, torch.randn(channels)
    state = (torch.randn(channels), torch.rand(channels) + 0.5, torch.tensor(2))

    got = kernel_workers.run_cuda_kernel(ghost_batch_norm, x, weight, bias, *state, g, 0.1, 1e-5)
    # the CPU op on the same values in float32 (exact for bf16/fp16 input)
    want = torch.ops.bnfx.ghost_batch_norm(x.float(), weight, bias, *state, g, 0.1, 1e-5)
    got_grads = kernel_workers.run_cuda_kernel(ghost_batch_norm_backward, dy, x, weight, got[4], got[5], g, 1e-5)
    want_grads = torch.ops.bnfx.ghost_batch_norm_backward(dy.float(), x.float(), weight, want[4], want[5], g, 1e-5)

    assert got[0].dtype == got_grads[0].dtype == dtype
    assert got[0].stride() == x.stride()  # the layout kept
    for g_state, w_state in zip(got[1:], want[1:]):  # running stats, count, save_mean, save_invstd
        torch.testing.assert_close(g_state, w_state, atol=1e-5, rtol=1e-5)
    for g_sum, w_sum in zip(got_grads[1:], want_grads[1:]):  # grad_weight, grad_bias (float32)
        torch.testing.assert_close(g_sum, w_sum, atol=1e-4, rtol=1e-4)
    if dtype == torch.float32:
        torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got_grads[0], want_grads[0], atol=1e-5, rtol=1e-5)
        return
    # reduced precision: about what torch's own batch norm in that dtype achieves
    x_low = x.detach().clone().requires_grad_()
    torch_out = ghost_chunk_loop(x_low, weight.to(dtype), bias.to(dtype), None, None, None, g, 0.1, 1e-5)
    (torch_grad,) = torch.autograd.grad(torch_out, x_low, dy)
    for ours, theirs, exact in ((got[0], torch_out, want[0]), (got_grads[0], torch_grad, want_grads[0])):
        torch_error = (theirs.float() - exact).abs().max().item()
        our_error = (ours.float() - exact).abs().max().item()
        assert our_error <= kernel_workers.low_precision_bound(dtype, torch_error, exact), (our_error, torch_error)


def test_ghost_kernel_empty_and_single_chunk_agree_with_plain_batch_norm():
    # one chunk (ghost size >= batch) is plain batch norm: torch's own as the reference
    torch.manual_seed(1)
    x = torch.randn(6, 4, 5, 5)
    got = kernel_workers.run_cuda_kernel(ghost_batch_norm, x, None, None, None, None, None, 64, 0.1, 1e-5)
    torch.testing.assert_close(got[0], F.batch_norm(x, None, None, training=True), atol=1e-5, rtol=1e-5)
    assert got[4].shape == (1, 4)


@pytest.mark.parametrize(
    "sizes,shape,dtype,channels_last",
    [
        ((5, 11), (3, 7, 7), torch.float32, False),
        ((5, 11), (3, 7, 7), torch.bfloat16, True),
        ((5, 11), (130,), torch.float32, False),
        ((6, 0, 9), (3, 7, 7), torch.float32, True),
    ],
)
def test_sync_kernel_matches_cpu_op(sizes, shape, dtype, channels_last):
    run_world(kernel_workers.triton_matches_cpu_op, len(sizes), list(sizes), shape, dtype, channels_last)


@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device")
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_ghost_module_on_gpu_trains_like_cpu(memory_format):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU())
    on_cpu = bnfx.transform(copy.deepcopy(model), ghost_batch_size=4)
    on_gpu = bnfx.transform(copy.deepcopy(model).cuda(), ghost_batch_size=4)
    x = torch.randn(10, 3, 9, 9).to(memory_format=memory_format)
    out_cpu, out_gpu = on_cpu(x), on_gpu(x.cuda())
    dy = torch.randn_like(out_cpu)
    out_cpu.backward(dy)
    out_gpu.backward(dy.cuda())
    torch.testing.assert_close(out_gpu.cpu(), out_cpu, atol=1e-4, rtol=1e-4)
    for (name, p_cpu), p_gpu in zip(on_cpu.named_parameters(), on_gpu.parameters()):
        torch.testing.assert_close(p_gpu.grad.cpu(), p_cpu.grad, atol=1e-4, rtol=1e-4, msg=name)
    for (name, b_cpu), b_gpu in zip(on_cpu.named_buffers(), on_gpu.buffers()):
        torch.testing.assert_close(b_gpu.cpu(), b_cpu, atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_sync_over_nccl_on_two_gpus():
    run_world(kernel_workers.nccl_sync_matches_one_process, 2, [5, 11])
