"""Double backward and forward-mode AD through ghost and sync batch norm: against torch's batch
norm per ghost batch (the chunk loop) and, for sync, one process on the concatenated batch."""

import subprocess
import sys
import textwrap

import pytest
import torch
import torch.autograd.forward_ad as forward_ad

import bnfx  # noqa: F401
import higher_order_workers
from bnfx.chunk_loop import ghost_chunk_loop
from gloo_world import run_world

op = torch.ops.bnfx.ghost_batch_norm


def _inputs(shape=(10, 3, 4)):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(shape, dtype=torch.float64, generator=generator) * 3 + 1
    weight = torch.randn(shape[1], dtype=torch.float64, generator=generator)
    bias = torch.randn(shape[1], dtype=torch.float64, generator=generator)
    return x, weight, bias


def _ghost(x, weight, bias, g):
    return op(x, weight, bias, None, None, None, g, 0.1, 1e-5)[0]


def _loop(x, weight, bias, g):
    return ghost_chunk_loop(x, weight, bias, None, None, None, g, 0.1, 1e-5)


@pytest.mark.parametrize("g", [16, 4, 3], ids=["one chunk", "chunks of 4", "uneven chunks"])
def test_second_derivatives_equal_the_chunk_loops(g, kernel):
    x, weight, bias = _inputs()
    upstream = torch.randn_like(x)
    results = []
    for fn in (_ghost, _loop):
        leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
        [grad_x] = torch.autograd.grad(fn(*leaves, g), leaves[0], upstream, create_graph=True)
        (grad_x.sin().sum()).backward()
        results.append([grad_x.detach()] + [t.grad for t in leaves[:2]])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want)


def _by_hand(x, weight, bias, g):
    """Ghost batch norm in elementary ops (torch's batch norm stops at second derivatives)."""
    chunks = []
    for chunk in x.chunk(-(-x.shape[0] // g)):
        dims = (0,) + tuple(range(2, x.dim()))
        var, mean = torch.var_mean(chunk, dims, correction=0, keepdim=True)
        chunks.append((chunk - mean) / torch.sqrt(var + 1e-5))
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return torch.cat(chunks) * weight.view(shape) + bias.view(shape)


@pytest.mark.parametrize("g", [16, 3], ids=["one chunk", "uneven chunks"])
def test_third_derivatives_are_not_cut(g):
    """The double backward is itself a graph: a third derivative equals that of batch norm
    written out (torch's own batch norm refuses third derivatives)."""
    x, weight, bias = _inputs((6, 2))
    results = []
    for fn in (_ghost, _by_hand):
        leaf = x.clone().requires_grad_()
        out = fn(leaf, weight, bias, g)
        [first] = torch.autograd.grad(out.pow(3).sum(), leaf, create_graph=True)
        [second] = torch.autograd.grad(first.pow(2).sum(), leaf, create_graph=True)
        [third] = torch.autograd.grad(second.sum(), leaf)
        results.append(third)
    torch.testing.assert_close(results[0], results[1])


@pytest.mark.parametrize("g", [16, 3], ids=["one chunk", "uneven chunks"])
def test_forward_mode_tangents_equal_the_chunk_loops(g):
    x, weight, bias = _inputs()
    tangents = [torch.randn_like(t) for t in (x, weight, bias)]
    results = []
    for fn in (_ghost, _loop):
        with forward_ad.dual_level():
            duals = [forward_ad.make_dual(p, t) for p, t in zip((x, weight, bias), tangents)]
            results.append(forward_ad.unpack_dual(fn(*duals, g)).tangent)
    torch.testing.assert_close(results[0], results[1])
    # torch.func.jvp, a transform, the same
    _, tangent = torch.func.jvp(lambda *args: _ghost(*args, g), (x, weight, bias), tuple(tangents))
    torch.testing.assert_close(tangent, results[1])


def test_gradgradcheck_and_forward_ad_of_the_op_directly():
    x, weight, bias = _inputs((7, 2, 3))
    inputs = [t.requires_grad_() for t in (x, weight, bias)]
    for g in (7, 3):
        fn = lambda *args: _ghost(*args, g)  # noqa: E731
        assert torch.autograd.gradcheck(fn, inputs, check_forward_ad=True, check_batched_grad=False)
        assert torch.autograd.gradgradcheck(fn, inputs)


def test_state_outputs_stay_non_differentiable_under_forward_ad():
    x, weight, bias = _inputs()
    state = (torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64), torch.tensor(0))
    with forward_ad.dual_level():
        outputs = op(forward_ad.make_dual(x, torch.ones_like(x)), weight, bias, *state, 4, 0.1, 1e-5)
        assert forward_ad.unpack_dual(outputs[0]).tangent is not None
        assert all(forward_ad.unpack_dual(t).tangent is None for t in outputs[1:])


@pytest.mark.parametrize("sizes", [(5, 3), (4, 0)], ids=["uneven", "an empty rank"])
def test_sync_second_derivatives_equal_one_process_on_the_concatenation(sizes):
    run_world(higher_order_workers.second_derivatives, 2, list(sizes))


@pytest.mark.parametrize("sizes", [(5, 3), (4, 0)], ids=["uneven", "an empty rank"])
def test_sync_tangents_equal_one_process_on_the_concatenation(sizes):
    run_world(higher_order_workers.tangents, 2, list(sizes))


def test_without_the_cpp_kernels_tangents_are_refused_not_dropped():
    """The Python autograd layer (other devices, or no C++ kernels) cannot take tangents: it
    raises, where dropping them would give zero tangents; double backward works there."""
    script = textwrap.dedent("""
        import importlib.util
        find_spec = importlib.util.find_spec
        importlib.util.find_spec = lambda name, *a: None if name.startswith("bnfx.ops._cpu_kernels") else find_spec(name, *a)
        import torch, torch.autograd.forward_ad as fwAD, bnfx
        m = bnfx.convert(torch.nn.BatchNorm1d(3).double(), ghost_batch_size=4)
        x = torch.randn(8, 3, dtype=torch.float64, requires_grad=True)
        [g] = torch.autograd.grad(m(x), x, torch.randn(8, 3, dtype=torch.float64), create_graph=True)
        g.sum().backward()
        assert x.grad is not None
        for trainable in (True, False):  # autograd's path, then the no-gradient path to the kernel
            m.requires_grad_(trainable)
            with fwAD.dual_level():
                try:
                    m(fwAD.make_dual(x.detach(), torch.ones(8, 3, dtype=torch.float64)))
                except NotImplementedError as error:
                    print("refused:", error)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    refusals = [line for line in result.stdout.splitlines() if line.startswith("refused:")]
    assert len(refusals) == 2, result.stdout
    assert "jvp" in refusals[0]  # torch's autograd.Function refuses
    assert "forward-mode AD through bnfx::ghost_batch_norm on cpu tensors" in refusals[1]


def test_sync_gradgradcheck_and_forward_ad_in_a_group_of_one(group_name, kernel):
    x, weight, bias = _inputs((6, 2, 3))
    inputs = [t.requires_grad_() for t in (x, weight, bias)]

    def fn(*args):
        return torch.ops.bnfx.sync_batch_norm(*args, None, None, None, 0.1, 1e-5, group_name)[0]

    assert torch.autograd.gradcheck(fn, inputs, check_forward_ad=True, check_batched_grad=False)
    assert torch.autograd.gradgradcheck(fn, inputs)
