"""Batch norm called with keyword arguments (``F.batch_norm(x, running_mean=..., ...)``,
``torch.batch_norm(input=..., ...)``): rewritten by every door, redirected in NormAct
forwards and counted by recompute_statistics, against the chunk loop written out."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnfx
from bnfx.chunk_loop import ChunkLoopBatchNorm, ghost_chunk_loop

GHOST, C = 4, 3


class KeywordCalls(nn.Module):
    """Two batch norms on the model's own parameters and buffers, every argument by keyword."""

    def __init__(self):
        super().__init__()
        for i in (1, 2):
            self.register_parameter(f"weight{i}", nn.Parameter(torch.rand(C) + 0.5))
            self.register_parameter(f"bias{i}", nn.Parameter(torch.randn(C)))
            self.register_buffer(f"mean{i}", torch.zeros(C))
            self.register_buffer(f"var{i}", torch.ones(C))

    def forward(self, x):
        x = F.batch_norm(x, running_mean=self.mean1, running_var=self.var1, weight=self.weight1, bias=self.bias1,
                         training=True, momentum=0.1, eps=1e-5)
        return torch.batch_norm(input=x.relu(), weight=self.weight2, bias=self.bias2, running_mean=self.mean2,
                                running_var=self.var2, training=True, momentum=0.1, eps=1e-5, cudnn_enabled=False)


def chunk_loop_reference(model: KeywordCalls, x):
    m = copy.deepcopy(model)
    y = ghost_chunk_loop(x, m.weight1, m.bias1, m.mean1, m.var1, None, GHOST, 0.1, 1e-5)
    y = ghost_chunk_loop(y.relu(), m.weight2, m.bias2, m.mean2, m.var2, None, GHOST, 0.1, 1e-5)
    return y, m


@pytest.mark.parametrize("door", ["transform", "compile", "export"])
def test_keyword_calls_are_rewritten(door):
    torch.manual_seed(0)
    model = KeywordCalls().double()
    x = torch.randn(10, C, 5, 5, dtype=torch.float64)
    expected, reference = chunk_loop_reference(model, x)
    if door == "transform":
        net = bnfx.transform(torch.fx.symbolic_trace(model), ghost_batch_size=GHOST)
        report = bnfx.explain(torch.fx.symbolic_trace(model), ghost_batch_size=GHOST)
    elif door == "compile":
        from bnfx import compile_backend

        first = len(compile_backend.graph_reports)
        net = torch.compile(model, backend=bnfx.backend(ghost_batch_size=GHOST, inner="aot_eager"), fullgraph=True)
    else:
        program = torch.export.export(model, (x,))
        report = bnfx.explain(program, ghost_batch_size=GHOST)
        net = bnfx.transform(program, ghost_batch_size=GHOST).module()
    torch.testing.assert_close(net(x), expected)
    if door == "compile":
        report = compile_backend.graph_reports[first]
    assert [r.action for r in report] == ["ghost", "ghost"], report
    state = net.state_dict() if door == "export" else model.state_dict()
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(state[key], value, msg=key)


class KeywordNormAct(nn.BatchNorm2d):
    """A NormAct layer whose forward calls torch.batch_norm with keywords."""

    def forward(self, x):
        if self.training:
            self.num_batches_tracked.add_(1)
        out = torch.batch_norm(input=x, weight=self.weight, bias=self.bias, running_mean=self.running_mean,
                               running_var=self.running_var, training=self.training, momentum=self.momentum,
                               eps=self.eps, cudnn_enabled=False)
        return out.relu()


def test_keyword_calls_in_a_norm_act_forward_are_redirected():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(C, 4, 3), KeywordNormAct(4)).double()
    reference = copy.deepcopy(model)
    reference[1] = ChunkLoopBatchNorm(reference[1], GHOST)
    bnfx.convert(model, ghost_batch_size=GHOST)
    x = torch.randn(10, C, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(model(x), reference(x))
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key.replace("batchnorm.", "")], value, msg=key)


def test_keyword_calls_are_counted_by_recompute_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(KeywordNormAct(C)).double()
    batches = [torch.randn(n, C, 4, 4, dtype=torch.float64) * 3 + 1 for n in (5, 7)]
    assert bnfx.recompute_statistics(model, batches) == ["0"]
    everything = torch.cat(batches).transpose(0, 1).flatten(1)  # [C, N*H*W]
    torch.testing.assert_close(model[0].running_mean, everything.mean(1))
    torch.testing.assert_close(model[0].running_var, everything.var(1))
