"""Graph structure of the sync pass, its fallbacks, and freeze: counted by target."""

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import bnfx
from bnfx.functional import frozen_batch_norm_module, sync_batch_norm_module
from bnfx.passes import report as report_module
from bnfx import rewriting
from bnfx.process_groups import SyncGroup
from graph_counts import ThreeForms, count
from world_of_one import world_of_one

SYNC_OP = torch.ops.bnfx.sync_batch_norm.default


@pytest.fixture
def two_ranks(monkeypatch):
    """Graph-structure tests only: the pass sees a group of 2 ranks (the op is never run)."""
    group = SyncGroup("fake", 2)
    monkeypatch.setattr(rewriting, "sync_group", lambda sync, group_size, create, plan: (group, ""))


def capture_graph(model, x, **options):
    seen = {}

    def inner(gm, example_inputs):
        seen["graph"] = gm
        return gm.forward

    compiled = torch.compile(model, backend=bnfx.backend(inner=inner, **options), fullgraph=True)
    return compiled, seen


def test_symbolic_trace_sites_rewritten(two_ranks):
    gm = fx.symbolic_trace(ThreeForms())
    new = bnfx.transform(gm, sync=True)
    assert count(new, sync_batch_norm_module) == 1 and count(new, "bn") == 0
    assert count(new, SYNC_OP) == 1 and count(new, F.batch_norm) == 0
    assert count(new, torch.batch_norm) == 1  # eval-mode literal stays
    report = bnfx.explain(gm, sync=True)
    assert [r.action for r in report] == ["sync", "sync", "left alone"]
    assert report.records[0].reason == "over 2 ranks"


def test_dynamo_graph_rewrite_replaces_counter_update(two_ranks):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.BatchNorm2d(4))
    compiled, seen = capture_graph(model, None, sync=True)
    with pytest.raises(Exception):  # the fake group cannot run the op; the graph is what counts
        compiled(torch.randn(8, 3, 6, 6))
    gm = seen["graph"]
    assert count(gm, F.batch_norm) == 0 and count(gm, SYNC_OP) == 2
    # mean, var, counter per site: the rewrite's copy_, or that of the module's traceable forward
    # (sync mode traces every batch norm as bnfx.module_batch_norm, one-sample ranks included)
    assert count(gm, torch.ops.aten.copy_.default) + count(gm, "copy_") == 6
    assert count(gm, "add_") == 0  # the op counts the batch


def test_without_process_group_sites_stay_plain_and_say_why(monkeypatch, caplog):
    monkeypatch.setattr(report_module, "_warned", set())
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    x = torch.randn(6, 3, 5, 5)
    with caplog.at_level(logging.WARNING, logger="bnfx"):
        gm = bnfx.transform(model, sync=True)
        bnfx.transform(model, sync=True)
    assert count(gm, "1") == 1 and count(gm, SYNC_OP) == 0
    expected = "bnfx: 1 batch-norm site stays plain batch norm (no initialized process group: plain batch norm): 1"
    assert [r.message for r in caplog.records].count(expected) == 1  # once per process
    report = bnfx.explain(model, sync=True)
    assert report.records[0].action == "left alone"
    assert report.records[0].reason == "no initialized process group: plain batch norm"
    reference = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    reference.load_state_dict(model.state_dict())
    torch.testing.assert_close(gm(x), reference(x))
    torch.testing.assert_close(model[1].running_mean, reference[1].running_mean)


def test_world_of_one_rank_is_plain_batch_norm():
    with world_of_one():
        report = bnfx.explain(nn.Sequential(nn.BatchNorm1d(3)))  # default mode: ghost, 1 rank
        assert report.records[0].action == "ghost"
        report = bnfx.explain(nn.Sequential(nn.BatchNorm1d(3)), sync=True)
        assert report.records[0].reason == "sync group of 1 rank: plain batch norm"


def test_bad_group_options_name_the_value():
    with world_of_one():
        with pytest.raises(ValueError, match="sync='no-such-group' names no process group"):
            bnfx.transform(nn.Sequential(nn.BatchNorm1d(3)), sync="no-such-group")
        with pytest.raises(ValueError, match="group_size=2 for 1 ranks"):
            bnfx.transform(nn.Sequential(nn.BatchNorm1d(3)), group_size=2)


def test_freeze_rewrites_module_and_functional_sites():
    model = ThreeForms()
    gm = bnfx.transform(fx.symbolic_trace(model), freeze=True)
    assert count(gm, frozen_batch_norm_module) == 1
    # the functional training site becomes an eval-mode F.batch_norm; the eval one too
    assert count(gm, F.batch_norm) == 2 and count(gm, torch.batch_norm) == 0 and count(gm, SYNC_OP) == 0
    report = bnfx.explain(fx.symbolic_trace(model), freeze=True)
    assert [r.action for r in report] == ["frozen"] * 3

    dynamo_model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    compiled, seen = capture_graph(dynamo_model, None, freeze=True)
    compiled(torch.randn(8, 3, 6, 6))
    gm = seen["graph"]
    assert count(gm, "add_") == 0 and count(gm, "detach") == 2
    assert dynamo_model[1].num_batches_tracked.item() == 0
