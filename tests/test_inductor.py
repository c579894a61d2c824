"""The default inner compiler, inductor: it fuses the decomposed ghost ops (numbers stay
Composer's) and the decomposed sync ops, whose all-reduces it compiles as functional
collectives."""

import torch
from torch import nn
from torch._dynamo.utils import counters

import bnfx  # noqa: F401  (registers torch.ops.bnfx)
import sync_workers
from bnfx.chunk_loop import chunk_loop_model
from gloo_world import run_world
from test_dynamic_batch import BATCHES


def test_inductor_matches_composer_with_changing_batch_sizes():
    torch.manual_seed(0)
    torch._dynamo.reset()
    counters.clear()
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))
    reference = chunk_loop_model(model, 4)
    compiled = torch.compile(model, backend="bnfx", options={"ghost_batch_size": 4})
    for batch in BATCHES:  # 16 even; the rest uneven chunks, one graph for a symbolic batch size
        x = torch.randn(batch, 3, 8, 8)
        out, ref_out = compiled(x), reference(x)
        grad = torch.randn_like(out)
        out.backward(grad)
        ref_out.backward(grad)
        torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(model[1].weight.grad, reference[1].batchnorm.weight.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(model[0].weight.grad, reference[0].weight.grad, rtol=1e-4, atol=1e-5)
        model.zero_grad()
        reference.zero_grad()
    state = model[1].state_dict()
    for key, value in reference[1].batchnorm.state_dict().items():
        torch.testing.assert_close(state[key], value, rtol=1e-4, atol=1e-6, msg=key)
    assert state["num_batches_tracked"].item() == 4 + 4 + 3 + 2
    assert counters["stats"]["unique_graphs"] <= 2  # the first compile, then one dynamic one


def test_inductor_sync_on_two_gloo_processes():
    run_world(sync_workers.inductor_step, 2, timeout=400)
