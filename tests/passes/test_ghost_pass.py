"""Graph structure: which sites the ghost pass finds and rewrites, counted by target."""

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

import bnfx
from bnfx.functional import ghost_batch_norm_module, ghost_own_forward
from bnfx.options import resolve_options
from bnfx.passes import find_sites, run_passes
from graph_counts import ThreeForms, count

GHOST_OP = torch.ops.bnfx.ghost_batch_norm.default


def test_symbolic_trace_sites_and_rewrite():
    gm = fx.symbolic_trace(ThreeForms())
    forms = [s.form for s in find_sites(gm)]
    assert forms == ["call_module", "F.batch_norm", "torch.batch_norm"]

    new = bnfx.transform(gm, ghost_batch_size=4)
    assert count(new, ghost_batch_norm_module) == 1
    assert count(new, "bn") == 0
    assert count(new, GHOST_OP) == 1 and count(new, F.batch_norm) == 0
    assert count(new, torch.batch_norm) == 1  # eval-mode literal stays
    assert count(gm, "bn") == 1 and count(gm, GHOST_OP) == 0  # input graph untouched

    report = bnfx.explain(gm, ghost_batch_size=4)
    assert [r.action for r in report] == ["ghost", "ghost", "left alone"]
    assert "eval mode" in report.records[2].reason
    text = str(report)
    assert "IR form" in text and "3 batch-norm sites, 2 rewritten" in text


def test_dynamo_graph_rewrite_replaces_counter_update():
    seen = {}

    def inner(gm, example_inputs):
        seen["graph"] = gm
        return gm.forward

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.BatchNorm2d(4))
    compiled = torch.compile(model, backend=bnfx.backend(ghost_batch_size=4, inner=inner), fullgraph=True)
    compiled(torch.randn(8, 3, 6, 6))
    gm = seen["graph"]
    assert count(gm, F.batch_norm) == 0
    assert count(gm, GHOST_OP) == 2
    assert count(gm, torch.ops.aten.copy_.default) == 6  # mean, var, counter per site
    assert count(gm, "add_") == 0  # Dynamo's num_batches_tracked.add_(1) replaced
    assert model[1].num_batches_tracked.item() == 2  # 8 samples, ghost batches of 4


def test_eval_mode_graph_left_alone():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    seen = {}

    def inner(gm, example_inputs):
        seen["graph"] = gm
        return gm.forward

    torch.compile(model, backend=bnfx.backend(ghost_batch_size=4, inner=inner))(torch.randn(8, 3, 6, 6))
    assert count(seen["graph"], F.batch_norm) == 1 and count(seen["graph"], GHOST_OP) == 0


def test_call_module_site_follows_train_eval_flag():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6))
    gm = bnfx.transform(model, ghost_batch_size=8)
    x = torch.randn(24, 5)
    gm(x)  # training: 3 ghost batches
    assert model[1].num_batches_tracked.item() == 3
    gm.eval()
    model.eval()
    torch.testing.assert_close(gm(x), model(x))
    assert model[1].num_batches_tracked.item() == 3


def test_subclass_with_its_own_forward_stays_one_call_to_its_forward():
    class MyBN(nn.BatchNorm1d):
        def forward(self, x):
            return super().forward(x) * 2

    gm = bnfx.transform(nn.Sequential(MyBN(4)), ghost_batch_size=4)
    assert count(gm, ghost_own_forward) == 1 and count(gm, ghost_batch_norm_module) == 0
    assert bnfx.explain(nn.Sequential(MyBN(4)), ghost_batch_size=4).records[0].action == "ghost"


def test_subclass_without_forward_is_rewritten():
    class Plain(nn.BatchNorm2d):
        pass

    gm = bnfx.transform(nn.Sequential(Plain(3)), ghost_batch_size=2)
    assert count(gm, ghost_batch_norm_module) == 1


def test_run_passes_reports_counts():
    gm = fx.symbolic_trace(ThreeForms())
    report = run_passes(gm, resolve_options({"ghost_batch_size": 2}))
    assert (report.found, report.rewritten_count) == (3, 2)
    assert sum(n.target is operator.getitem for n in gm.graph.nodes) >= 1
