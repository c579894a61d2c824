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
from composer_reference import assert_steps_equal, composer_model, unwrapped_state
from norm_act import BatchNormAct2d, norm_act_model

GHOST_OP = torch.ops.bnfx.ghost_batch_norm.default


def steps_equal_composer(model, reference, net):
    """Two training steps against Composer's chunk loop around the subclass's own forward."""
    inputs = [torch.randn(batch, 3, 8, 8, dtype=torch.float64) for batch in (16, 13)]  # 4 chunks of 4; 5, 5, 3
    assert_steps_equal(model, reference, net, inputs)


def test_transform_runs_the_subclass_forward_with_ghost_statistics():
    torch.manual_seed(0)
    model = norm_act_model().double()  # one NormAct with momentum=None
    reference = composer_model(model, 5)
    records = bnfx.explain(model, ghost_batch_size=5).records
    assert [(r.name, r.action) for r in records] == [("1", "ghost"), ("3", "ghost")]
    steps_equal_composer(model, reference, bnfx.transform(model, ghost_batch_size=5))
    assert set(model.state_dict()) == set(norm_act_model().state_dict())  # checkpoint keys unchanged


def float_momentum_model():
    torch.manual_seed(0)
    model = norm_act_model().double()
    model[3].momentum = 0.3  # torch.compile and torch.export cannot trace momentum=None (README)
    return model


def test_compile_rewrites_the_call_inside_the_forward():
    model = float_momentum_model()
    reference = composer_model(model, 5)
    torch._dynamo.reset()
    compile_backend.graph_reports.clear()
    net = torch.compile(model, backend="bnfx", fullgraph=True, options={"ghost_batch_size": 5, "inner": "aot_eager"})
    steps_equal_composer(model, reference, net)
    assert sum(report.rewritten_count for report in compile_backend.graph_reports) >= 2


@pytest.mark.parametrize("decomposed", [False, True], ids=["training-IR", "decomposed-IR"])
def test_export_rewrites_the_call_inside_the_forward(decomposed):
    model = float_momentum_model()
    reference = composer_model(model, 5)
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


def test_sync_mode_redirects_to_the_group(monkeypatch):
    """One rank here: the call inside the forward reaches the sync functional with the group."""
    import bnfx.functional as functional

    seen = []
    monkeypatch.setattr(functional, "_sync_batch_norm", lambda *args, **kwargs: seen.append(kwargs) or args[0])
    layer = BatchNormAct2d(3)
    out = functional.sync_own_forward(layer, "group-x", torch.randn(4, 3, 2, 2))
    assert seen and seen[0]["group_name"] == "group-x" and (out >= 0).all()  # the activation ran after it
