"""Every batch-norm site bnfx is asked to rewrite is rewritten, or the user is told why.

Also the forms that used to stay plain without a word: Dynamo's graph values for momentum
and eps under ``dynamic=True``, lazy modules, and the errors of models bnfx cannot trace.
"""

import copy
import logging
import operator

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import fx, nn

import bnfx
from bnfx import compile_backend
from bnfx.passes import report as report_module
from bnfx.passes.rewrite import REASONS, MOMENTUM_NONE_WITHOUT_COUNTER, TRAINING_IN_GRAPH
from bnfx.passes.rewrite import USES_SAVED_STATISTICS
from bnfx.process_groups import FALLBACKS, NO_PROCESS_GROUP, NOT_A_MEMBER, ONE_RANK
from cli_models import DataDependent
from bnfx.chunk_loop import chunk_loop_model, unwrapped_state
from world_of_one import world_of_one


class TrainingFromShape(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(4))

    def forward(self, x):
        return F.batch_norm(x, None, None, self.weight, None, x.shape[0] > 1)


class CumulativeWithoutCounter(nn.Module):
    """momentum=None over buffers that have no num_batches_tracked beside them."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.zeros(4))
        self.register_buffer("var", torch.ones(4))

    def forward(self, x):
        return F.batch_norm(x, self.mean, self.var, None, None, True, None)


def uses_saved_statistics() -> fx.GraphModule:
    """A decomposed-IR graph that returns batch norm's saved mean, which bnfx's op does not make."""
    graph = fx.Graph()
    x, weight, bias, mean, var = (graph.placeholder(name) for name in ("x", "weight", "bias", "mean", "var"))
    bn = graph.call_function(
        torch.ops.aten._native_batch_norm_legit_functional.default, (x, weight, bias, mean, var, True, 0.1, 1e-5)
    )
    graph.output((graph.call_function(operator.getitem, (bn, 0)), graph.call_function(operator.getitem, (bn, 1))))
    return fx.GraphModule(nn.Module(), graph)


def sequential(bn):
    return nn.Sequential(nn.Conv2d(3, 4, 3), bn)


NOT_A_MEMBER_OPTIONS = {"sync": "non-member"}  # resolved inside the world of one below

# reason -> (graph or model factory, options, the site's name in the warning)
CASES = {
    TRAINING_IN_GRAPH: (TrainingFromShape, {"ghost_batch_size": 4}, "batch_norm"),
    MOMENTUM_NONE_WITHOUT_COUNTER: (CumulativeWithoutCounter, {"ghost_batch_size": 4}, "batch_norm"),
    USES_SAVED_STATISTICS: (uses_saved_statistics, {"ghost_batch_size": 4}, "_native_batch_norm_legit_functional_default"),
    NO_PROCESS_GROUP: (lambda: sequential(nn.BatchNorm2d(4)), {"sync": True}, "1"),
    ONE_RANK: (lambda: sequential(nn.BatchNorm2d(4)), {"sync": True}, "1"),
    NOT_A_MEMBER: (lambda: sequential(nn.BatchNorm2d(4)), NOT_A_MEMBER_OPTIONS, "1"),
}


def test_the_cases_walk_every_reason():
    assert set(CASES) == set(REASONS) | set(FALLBACKS)


@pytest.fixture
def fresh_warnings(monkeypatch, caplog):
    monkeypatch.setattr(report_module, "_warned", set())
    caplog.set_level(logging.WARNING, logger="bnfx")
    return caplog


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "bnfx" and r.levelno == logging.WARNING]


@pytest.mark.parametrize("reason", list(CASES))
def test_a_site_left_plain_is_a_warning_naming_it_and_the_reason(reason, fresh_warnings):
    factory, options, site = CASES[reason]
    model = factory()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    needs_world = reason in (ONE_RANK, NOT_A_MEMBER)
    with world_of_one() if needs_world else _nothing():
        if options is NOT_A_MEMBER_OPTIONS:
            options = {"sync": dist.GroupMember.NON_GROUP_MEMBER}
        report = bnfx.explain(model, **options)
        assert not _warnings(fresh_warnings), "explain reports, it does not warn"
        bnfx.transform(model, **options)
    [record] = report.plain
    assert (record.name, record.reason) == (site, reason)
    [message] = _warnings(fresh_warnings)
    assert f"stays plain batch norm ({reason}): {site}" in message, message
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def test_the_compile_door_warns_too(fresh_warnings):
    model = sequential(nn.BatchNorm2d(4))
    compiled = torch.compile(model, backend="bnfx", options={"sync": True, "inner": "eager"})
    compiled(torch.randn(6, 3, 5, 5))
    [message] = _warnings(fresh_warnings)
    assert f"({NO_PROCESS_GROUP}): 1" in message, message
    assert compile_backend.graph_reports[-1].plain[0].reason == NO_PROCESS_GROUP


def test_eval_mode_sites_are_left_alone_without_a_warning(fresh_warnings):
    model = sequential(nn.BatchNorm2d(4)).eval()
    program = torch.export.export(model, (torch.randn(4, 3, 5, 5),)).run_decompositions()
    report = bnfx.explain(program, ghost_batch_size=2)
    assert [r.action for r in report] == ["left alone"] and not report.plain
    bnfx.transform(program, ghost_batch_size=2)
    assert not _warnings(fresh_warnings)


# dynamic=True: Dynamo passes the module's float momentum and eps as tensors and reads them
# with .item() inside the graph; the sites are rewritten in the first graph all the same.


class TwoSites(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn2d = nn.BatchNorm2d(4, eps=1e-3)
        self.bn1d = nn.BatchNorm1d(4, momentum=0.3)

    def forward(self, x):
        return self.bn1d(self.bn2d(self.conv(x)).relu().mean((2, 3)))


# inductor compiles forward and backward again for each new chunk layout: fewer sizes
BATCHES = {"eager": [8, 12, 7, 10], "aot_eager": [8, 12, 7, 10], "inductor": [8, 12]}


@pytest.mark.parametrize("inner", list(BATCHES))
def test_dynamic_shapes_rewrite_every_site_in_the_first_graph(inner):
    torch.manual_seed(0)
    model = TwoSites()
    reference = chunk_loop_model(model, 4)
    first = len(compile_backend.graph_reports)
    compiled = torch.compile(model, backend="bnfx", options={"ghost_batch_size": 4, "inner": inner}, dynamic=True)
    generator = torch.Generator().manual_seed(1)
    for step, batch in enumerate(BATCHES[inner]):
        if step == len(BATCHES[inner]) - 1:  # torch reads the attribute at every call: so must the graph
            model.bn1d.momentum = reference.bn1d.batchnorm.momentum = 0.9
        x = torch.randn(batch, 3, 6, 6, generator=generator)
        dy = torch.randn(batch, 4, generator=generator)
        x_ours, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
        out, out_ref = compiled(x_ours), reference(x_ref)
        out.backward(dy)
        out_ref.backward(dy)
        where = f"{inner}, step {step} (batch {batch})"
        torch.testing.assert_close(out, out_ref, rtol=1e-4, atol=1e-5, msg=lambda m: f"{where}: output\n{m}")
        torch.testing.assert_close(x_ours.grad, x_ref.grad, rtol=1e-4, atol=1e-5, msg=lambda m: f"{where}: grad\n{m}")
        reference_state = unwrapped_state(reference)
        for key, value in model.state_dict().items():
            torch.testing.assert_close(value, reference_state[key], rtol=1e-4, atol=1e-6, msg=lambda m: f"{where}: {key}\n{m}")
    reports = compile_backend.graph_reports[first:]
    assert reports[0].found == 2 and reports[0].rewritten_count == 2, str(reports[0])
    assert all(r.rewritten_count == r.found == 2 for r in reports), [str(r) for r in reports]


def test_a_one_sample_ghost_batch_under_dynamic_shapes_names_the_batch_size():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    compiled = torch.compile(model, backend="bnfx", options={"ghost_batch_size": 4, "inner": "aot_eager"}, dynamic=True)
    compiled(torch.randn(8, 3))
    with pytest.raises(Exception, match=r"ghost batch of 1 sample .*\(batch size 13, ghost_batch_size=4"):
        compiled(torch.randn(13, 3))  # chunks of 4, 4, 4 and 1


def test_a_lazy_model_gets_ghost_batch_norm_from_its_first_forward():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.LazyBatchNorm2d(momentum=0.2))
    net = bnfx.transform(model, ghost_batch_size=4)
    assert bnfx.explain(model, ghost_batch_size=4).records[0].action == "ghost"
    initialized = nn.Sequential(copy.deepcopy(model[0]), nn.BatchNorm2d(4, momentum=0.2))
    reference = chunk_loop_model(initialized, 4)
    generator = torch.Generator().manual_seed(2)
    for step in range(2):
        x = torch.randn(10, 3, 6, 6, generator=generator)
        torch.testing.assert_close(net(x), reference(x), rtol=1e-4, atol=1e-5, msg=f"step {step}")
    assert type(model[1]) is nn.BatchNorm2d
    reference_state = unwrapped_state(reference)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, reference_state[key], msg=key)


def test_an_untraceable_model_is_told_which_doors_work():
    with pytest.raises(fx.proxy.TraceError, match=r"cannot trace DataDependent .*control flow") as error:
        bnfx.transform(DataDependent(), ghost_batch_size=2)
    assert 'torch.compile(model, backend="bnfx"' in str(error.value)
    assert "torch.export.export" in str(error.value)


def test_ghost_under_ddp_reaches_a_top_level_sequential():
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    reference = chunk_loop_model(model, 4)
    x = torch.randn(10, 3, 6, 6, generator=torch.Generator().manual_seed(3))
    with world_of_one():
        compiled = torch.compile(DDP(model), backend="bnfx", options={"ghost_batch_size": 4, "inner": "aot_eager"})
        out = compiled(x)
    torch.testing.assert_close(out, reference(x), rtol=1e-4, atol=1e-5)
    assert model[1].num_batches_tracked.item() == 3  # chunks of 4, 4 and 2
