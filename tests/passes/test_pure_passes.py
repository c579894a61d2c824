"""The passes are pure functions of a graph and options: with a process group initialized, no
pass makes a torch.distributed call or creates a communicator (the doors do that, before)."""

import types
import warnings

import pytest
import torch
import torch.distributed as dist
from torch import fx, nn

from bnfx import process_groups
from bnfx.options import resolve_options
from bnfx.passes import find_sites, plan_sync, run_passes
from bnfx.passes.fold import fold_batch_norm
from bnfx.passes.report import Report
from bnfx.process_groups import SyncGroup
from bnfx.tracing import BatchNormTracer
from graph_counts import ThreeForms
from norm_act import norm_act_model
from world_of_one import world_of_one


def _forbid_distributed(monkeypatch):
    """Every function of torch.distributed (and of its c10d module), and bnfx's group creation,
    raises when called."""

    def forbidden(name):
        def call(*args, **kwargs):
            raise AssertionError(f"a pass called {name}")

        return call

    for module in (dist, dist.distributed_c10d):
        with warnings.catch_warnings():  # touching torch's deprecated aliases warns
            warnings.simplefilter("ignore", FutureWarning)
            functions = [name for name, value in vars(module).items()
                         if isinstance(value, types.FunctionType) and not name.startswith("__")]
        for name in functions:
            monkeypatch.setattr(module, name, forbidden(f"{module.__name__}.{name}"))
    for name in ("sync_group", "named_group", "_communicator"):
        monkeypatch.setattr(process_groups, name, forbidden(f"bnfx.process_groups.{name}"))


def graphs():
    torch.manual_seed(0)
    with_sync_batch_norm = nn.Sequential(nn.Conv2d(3, 4, 3), nn.SyncBatchNorm(4), nn.BatchNorm2d(4))
    x = torch.randn(4, 3, 8, 8)
    return {
        "three-forms": fx.symbolic_trace(ThreeForms()),
        "norm-act": fx.GraphModule(norm_act_model(), BatchNormTracer().trace(norm_act_model())),
        "sync-batch-norm": fx.symbolic_trace(with_sync_batch_norm),
        "exported": torch.export.export(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), (x,)).graph_module,
    }


@pytest.mark.parametrize("options", [{"ghost_batch_size": 2}, {"sync": True}, {"sync": True, "freeze": True}],
                         ids=["ghost", "sync", "freeze"])
@pytest.mark.parametrize("graph", ["three-forms", "norm-act", "sync-batch-norm", "exported"])
def test_no_pass_touches_torch_distributed(graph, options, monkeypatch):
    with world_of_one():
        gm = graphs()[graph]
        opts = resolve_options(options)
        _forbid_distributed(monkeypatch)
        sites = find_sites(gm)
        groups = None
        if opts.mode == "sync":
            groups = {sync: (SyncGroup("resolved-by-the-door", 2), "") for sync in plan_sync(gm, opts).syncs}
        report = run_passes(gm, opts, groups)
        monkeypatch.undo()
    assert report.found == len(sites) > 0
    assert report.rewritten_count > 0


def test_fold_touches_no_torch_distributed(monkeypatch):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    with world_of_one():
        gm = fx.symbolic_trace(model)
        _forbid_distributed(monkeypatch)
        report = Report(done="folded")
        fold_batch_norm(gm, {}, report)
        monkeypatch.undo()
    assert report.rewritten_count == 1
