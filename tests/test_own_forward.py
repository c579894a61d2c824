"""Batch-norm subclasses with a forward of their own (NormAct layers), through every door:
the forward runs as written, with ghost statistics in the batch-norm call inside it."""

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnfx
from bnfx import compile_backend
from bnfx.chunk_loop import chunk_loop_model, unwrapped_state
from composer_reference import assert_steps_equal
from norm_act import norm_act_model

GHOST_OP = torch.ops.bnfx.ghost_batch_norm.default


def steps_equal_composer(model, reference, net):
    """Two training steps against Composer's chunk loop around the subclass's own forward."""
    inputs = [torch.randn(batch, 3, 8, 8, dtype=torch.float64) for batch in (16, 13)]  # 4 chunks of 4; 5, 5, 3
    assert_steps_equal(model, reference, net, inputs)


def test_transform_runs_the_subclass_forward_with_ghost_statistics():
    torch.manual_seed(0)
    model = norm_act_model().double()  # one NormAct with momentum=None
    reference = chunk_loop_model(model, 5)
    records = bnfx.explain(model, ghost_batch_size=5).records
    assert [(r.name, r.action) for r in records] == [("1", "ghost"), ("3", "ghost")]
    steps_equal_composer(model, reference, bnfx.transform(model, ghost_batch_size=5))
    assert set(model.state_dict()) == set(norm_act_model().state_dict())  # checkpoint keys unchanged


def float_momentum_model():
    torch.manual_seed(0)
    model = norm_act_model().double()
    model[3].momentum = 0.3  # torch.export cannot trace momentum=None's float(num_batches_tracked) (README)
    return model


def test_compile_rewrites_the_call_inside_the_forward():
    """One NormAct with a float momentum (Dynamo inlines its forward), one with momentum=None
    (bnfx gives it a forward Dynamo can trace): one graph, both rewritten."""
    torch.manual_seed(0)
    model = norm_act_model().double()
    reference = chunk_loop_model(model, 5)
    torch._dynamo.reset()
    compile_backend.graph_reports.clear()
    net = torch.compile(model, backend="bnfx", fullgraph=True, options={"ghost_batch_size": 5, "inner": "aot_eager"})
    steps_equal_composer(model, reference, net)
    for report in compile_backend.graph_reports:
        assert [(r.name, r.action) for r in report] == [("1", "ghost"), ("3", "ghost")]


@pytest.mark.parametrize("decomposed", [False, True], ids=["training-IR", "decomposed-IR"])
def test_export_of_the_transformed_model_with_momentum_none(decomposed):
    """torch.export fails on momentum=None's float(num_batches_tracked) in the module itself;
    the transformed graph answers it without reading the counter, and exports."""
    torch.manual_seed(0)
    model = norm_act_model().double()
    reference = chunk_loop_model(model, 5)
    net = bnfx.transform(model, ghost_batch_size=5)
    ep = torch.export.export(net, (torch.randn(16, 3, 8, 8, dtype=torch.float64),))
    ep = ep.run_decompositions() if decomposed else ep
    assert sum(n.target is GHOST_OP for n in ep.graph_module.graph.nodes) == 2
    module = ep.module()
    for _ in range(2):
        x = torch.randn(16, 3, 8, 8, dtype=torch.float64)
        torch.testing.assert_close(module(x), reference(x))
    for key, value in unwrapped_state(reference).items():
        torch.testing.assert_close(module.state_dict()[key], value, msg=key)


@pytest.mark.parametrize("decomposed", [False, True], ids=["training-IR", "decomposed-IR"])
def test_export_rewrites_the_call_inside_the_forward(decomposed):
    model = float_momentum_model()
    reference = chunk_loop_model(model, 5)
    ep = torch.export.export(copy.deepcopy(model), (torch.randn(16, 3, 8, 8, dtype=torch.float64),))
    ep = ep.run_decompositions() if decomposed else ep
    rewritten = bnfx.transform(ep, ghost_batch_size=5)
    assert sum(n.target is GHOST_OP for n in rewritten.graph_module.graph.nodes) == 2
    module = rewritten.module()
    x = torch.randn(16, 3, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(module(x), reference(x))
    for key, value in unwrapped_state(reference).items():
        torch.testing.assert_close(module.state_dict()[key], value, msg=key)


def test_freeze_keeps_the_forward_and_freezes_the_call_inside():
    torch.manual_seed(0)
    model = norm_act_model().double()
    with torch.no_grad():
        for bn in (model[1], model[3]):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
    before = copy.deepcopy(model.state_dict())
    net = bnfx.transform(model, freeze=True)
    x = torch.randn(6, 3, 8, 8, dtype=torch.float64)
    out = net(x)
    expected = copy.deepcopy(model).eval()(x)  # eval: running statistics, the same activations
    torch.testing.assert_close(out, expected)
    out.backward(torch.randn_like(out))
    for bn in (model[1], model[3]):
        assert bn.weight.grad is None and bn.bias.grad is None
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert model[0].weight.grad is not None


class ManualBatchNorm(nn.BatchNorm2d):
    """Computes batch norm itself, without F.batch_norm: nothing for bnfx to redirect."""

    def forward(self, x):
        mean, var = x.mean((0, 2, 3), keepdim=True), x.var((0, 2, 3), keepdim=True, unbiased=False)
        return F.relu((x - mean) / torch.sqrt(var + self.eps))


def test_a_forward_without_a_batch_norm_call_is_a_warning(caplog):
    caplog.set_level(logging.WARNING, logger="bnfx")
    net = bnfx.transform(nn.Sequential(ManualBatchNorm(3)), ghost_batch_size=4)
    net(torch.randn(8, 3, 4, 4))
    assert any("ManualBatchNorm.forward computed batch norm without F.batch_norm" in r.getMessage()
               for r in caplog.records)
