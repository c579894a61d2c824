"""Flags frozen at trace time: ``torch.fx.symbolic_trace`` traces through a batch-norm
subclass's own forward (NormAct layers) and bakes its train/eval flag into the
``F.batch_norm`` call. A rewritten site on the module's own statistics follows the module's
flag at run time; what the trace read of momentum and the counter is said at WARNING level."""

import contextlib
import copy
import logging

import pytest
import torch
from torch import fx, nn

import bnfx
from bnfx.passes import report as report_module
from bnfx.chunk_loop import chunk_loop_model, unwrapped_state
from norm_act import BatchNormAct2d
from world_of_one import world_of_one

GHOST = 4


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), BatchNormAct2d(4), nn.Conv2d(4, 4, 3), BatchNormAct2d(4)).double()


def _randomized_state(module):
    with torch.no_grad():
        for bn in module.modules():
            if isinstance(bn, BatchNormAct2d):
                bn.running_mean.uniform_(-1, 1)
                bn.running_var.uniform_(0.5, 2)
    return module


@pytest.mark.parametrize("options", [{"ghost_batch_size": GHOST}, {"sync": True}])
def test_symbolic_trace_of_norm_act_layers_follows_the_modules_flag(options, caplog, monkeypatch):
    monkeypatch.setattr(report_module, "_warned", set())  # warnings are given once per process
    reference = _randomized_state(model())
    # symbolic_trace runs the forward: its counter moves once, on a copy
    traced = fx.symbolic_trace(copy.deepcopy(reference))
    with world_of_one() if "sync" in options else contextlib.nullcontext():
        with caplog.at_level(logging.WARNING, logger="bnfx"):
            gm = bnfx.transform(traced, **options)
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert any("1, 3" in w and "bnfx.trace" in w for w in warnings), warnings
        # training: ghost (or, sync over one rank, plain) statistics, as the reference computes them
        expected = chunk_loop_model(reference, GHOST) if "ghost_batch_size" in options else reference
        x = torch.randn(10, 3, 8, 8, dtype=torch.float64)
        torch.testing.assert_close(gm(x), expected(x))
        state = unwrapped_state(expected) if "ghost_batch_size" in options else expected.state_dict()
        for key, value in gm.state_dict().items():
            torch.testing.assert_close(value, state[key], msg=key)
        # eval, after gm.eval(): the running statistics, which stay where they are
        gm.eval()
        expected.eval()
        before = {key: value.clone() for key, value in gm.state_dict().items()}
        torch.testing.assert_close(gm(x), expected(x))
        for key, value in gm.state_dict().items():
            assert torch.equal(value, before[key]), key


def test_a_graph_on_the_modules_themselves_takes_their_momentum_and_counter():
    # a graph whose get_attr nodes reach the batch-norm module itself (not symbolic_trace's container)
    reference = model()
    reference[1].momentum = None  # cumulative average: the counter decides
    traced = fx.symbolic_trace(copy.deepcopy(reference))
    graph = copy.deepcopy(traced.graph)
    root = copy.deepcopy(reference)
    gm = fx.GraphModule(root, graph)
    for name in ("1", "3"):  # the modules themselves where symbolic_trace left containers
        setattr(gm, name, root[int(name)])
    expected = chunk_loop_model(reference, GHOST)
    rewritten = bnfx.transform(gm, ghost_batch_size=GHOST)
    assert all(r.warning == "" for r in bnfx.explain(gm, ghost_batch_size=GHOST))
    for batch in (10, 8):
        x = torch.randn(batch, 3, 8, 8, dtype=torch.float64)
        torch.testing.assert_close(rewritten(x), expected(x))
    for key, value in unwrapped_state(expected).items():
        torch.testing.assert_close(root.state_dict()[key], value, msg=key)
    rewritten.eval()
    expected.eval()
    x = torch.randn(6, 3, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(rewritten(x), expected(x))
