"""Batch-norm sites inside the subgraphs of higher-order ops: activation checkpointing,
``torch.cond``, nested GraphModules. Each is rewritten like any other site."""

import copy

import pytest
import torch
from torch import fx, nn

import bnfx
from bnfx import compile_backend
from bnfx.chunk_loop import chunk_loop_model, unwrapped_state
from bnfx.recomputation import run_checkpointed
from checkpointed import CheckpointedBlocks, without_checkpointing
from norm_act import BatchNormAct2d

GHOST = 4


def _steps(model, reference, net, batch=10, steps=2):
    """SGD steps of ``net`` (``model`` compiled) and ``reference`` on the same float64 data:
    outputs, input gradients, parameters; then buffers, counters included."""
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, reference)]
    for step in range(steps):
        generator = torch.Generator().manual_seed(step)
        x = torch.randn(batch, 3, 6, 6, dtype=torch.float64, generator=generator)
        x, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
        out, out_ref = net(x), reference(x_ref)
        grad = torch.randn(out.shape, dtype=torch.float64, generator=generator)
        out.backward(grad)
        out_ref.backward(grad)
        torch.testing.assert_close(out, out_ref)
        torch.testing.assert_close(x.grad, x_ref.grad)
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()
    expected = unwrapped_state(reference)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, expected[key], msg=key)


@pytest.mark.parametrize("inner", ["aot_eager", "inductor"])
@pytest.mark.parametrize("use_reentrant", [False, True])
def test_checkpointed_blocks_under_compile_equal_the_model_without_checkpointing(use_reentrant, inner):
    if inner == "inductor" and use_reentrant:
        pytest.skip("one inductor case: Dynamo traces both forms into the same higher-order op")
    model = CheckpointedBlocks(use_reentrant=use_reentrant).double()
    reference = chunk_loop_model(without_checkpointing(copy.deepcopy(model)), GHOST)
    first = len(compile_backend.graph_reports)
    net = torch.compile(model, backend=bnfx.backend(ghost_batch_size=GHOST, inner=inner))
    _steps(model, reference, net)
    records = [r for report in compile_backend.graph_reports[first:] for r in report]
    assert [r.action for r in records] == ["ghost"] * 3, records
    assert {r.name for r in records} == {"blocks.0.bn", "blocks.1.bn", "head"}


class Branches(nn.Module):
    """Batch norm in both branches of ``torch.cond`` (without running statistics: torch's
    ``cond`` refuses branches that update buffers)."""

    def __init__(self):
        super().__init__()
        self.positive = nn.BatchNorm1d(4, track_running_stats=False)
        self.negative = nn.BatchNorm1d(4, track_running_stats=False)

    def forward(self, x):
        return torch.cond(x.sum() > 0, lambda x: self.positive(x), lambda x: 2 * self.negative(x), (x,))


def _branch_reference(model, x):
    reference = chunk_loop_model(model, GHOST)
    return reference.positive(x) if x.sum() > 0 else 2 * reference.negative(x)


@pytest.mark.parametrize("door", ["compile", "export"])
def test_cond_branches_are_rewritten(door):
    model = Branches()
    x = torch.randn(10, 4) + 0.5
    if door == "compile":
        first = len(compile_backend.graph_reports)
        net = torch.compile(model, backend=bnfx.backend(ghost_batch_size=GHOST, inner="aot_eager"))
        out = net(x)
        records = [r for report in compile_backend.graph_reports[first:] for r in report]
    else:
        program = torch.export.export(model, (x,))
        records = list(bnfx.explain(program, ghost_batch_size=GHOST))
        out = bnfx.transform(program, ghost_batch_size=GHOST).module()(x)
    assert [r.action for r in records] == ["ghost", "ghost"], records
    torch.testing.assert_close(out, _branch_reference(model, x))
    # the other branch too: batch statistics per ghost batch, not over the whole batch
    torch.testing.assert_close(net(-x) if door == "compile" else bnfx.transform(
        program, ghost_batch_size=GHOST).module()(-x), _branch_reference(model, -x))


def test_a_graph_module_called_as_a_submodule_is_rewritten():
    # split_module's form: the outer graph calls its pieces as GraphModule submodules
    inner = fx.symbolic_trace(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)))
    root = nn.Module()
    root.piece = inner
    graph = fx.Graph()
    x = graph.placeholder("x")
    graph.output(graph.call_module("piece", (x,)))
    outer = fx.GraphModule(root, graph)
    report = bnfx.explain(outer, ghost_batch_size=GHOST)
    assert [r.action for r in report] == ["ghost"], report
    rewritten = bnfx.transform(outer, ghost_batch_size=GHOST)
    x = torch.randn(10, 3)
    torch.testing.assert_close(rewritten(x), chunk_loop_model(inner, GHOST)(x))
    assert inner.graph.find_nodes(op="call_module", target="1"), "the input's nested graph is untouched"


def test_timm_grad_checkpointing_rewrites_every_site():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=4).double()
    reference = chunk_loop_model(model, GHOST)
    model.set_grad_checkpointing(True)
    first = len(compile_backend.graph_reports)
    net = torch.compile(model, backend=bnfx.backend(ghost_batch_size=GHOST, inner="aot_eager"))
    x = torch.randn(8, 3, 32, 32, dtype=torch.float64)
    out, out_ref = net(x), reference(x)
    grad = torch.randn_like(out)
    out.backward(grad)
    out_ref.backward(grad)
    records = [r for report in compile_backend.graph_reports[first:] for r in report]
    assert len(records) == 20 and {r.action for r in records} == {"ghost"}, records
    torch.testing.assert_close(out, out_ref)
    expected = unwrapped_state(reference)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, expected[key], msg=key)
    reference_grads = dict(reference.named_parameters())
    for name, param in model.named_parameters():
        key = name if name in reference_grads else name.rsplit(".", 1)[0] + ".batchnorm." + name.rsplit(".", 1)[1]
        torch.testing.assert_close(param.grad, reference_grads[key].grad, msg=name)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_bnfx_trace_keeps_checkpoint_calls(use_reentrant):
    model = CheckpointedBlocks(use_reentrant=use_reentrant).double()
    traced = bnfx.trace(model)
    assert sum(n.target is run_checkpointed for n in traced.graph.nodes) == 2
    assert sorted(traced.state_dict()) == sorted(model.state_dict())  # the regions hold no state of their own
    assert len(list(traced.parameters())) == len(list(model.parameters()))
    # the reference: Composer's loop without checkpointing. The recomputation in the backward
    # updates no running statistics (torch's batch norm, eagerly, would update them twice)
    reference = chunk_loop_model(without_checkpointing(copy.deepcopy(model)), GHOST)
    rewritten = bnfx.transform(model, ghost_batch_size=GHOST)
    assert [r.action for r in bnfx.explain(model, ghost_batch_size=GHOST)] == ["ghost"] * 3
    assert traced.code == bnfx.trace(model).code, "transform leaves the input's regions alone"
    calls = []
    model.blocks[0].conv.register_forward_hook(lambda *_: calls.append(1))
    for batch in (10, 8):
        x = torch.randn(batch, 3, 6, 6, dtype=torch.float64)
        x, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
        out, out_ref = rewritten(x), reference(x_ref)
        grad = torch.randn_like(out)
        out.backward(grad)
        out_ref.backward(grad)
        torch.testing.assert_close(out, out_ref)
        torch.testing.assert_close(x.grad, x_ref.grad)
    assert len(calls) == 4, "each step runs the checkpointed block twice: forward, then recomputation"
    expected = unwrapped_state(reference)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, expected[key], msg=key)


def test_a_checkpoint_call_bnfx_trace_cannot_keep_is_said(caplog):
    class ContextFn(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))

        def forward(self, x):
            from torch.utils.checkpoint import checkpoint  # the imported name, not the attribute

            return checkpoint(self.block, x, use_reentrant=False, context_fn=torch.utils.checkpoint.noop_context_fn)

    with caplog.at_level("WARNING", logger="bnfx"):
        traced = bnfx.trace(ContextFn())
    assert any("context_fn" in r.getMessage() and "Sequential" in r.getMessage() for r in caplog.records)
    assert not any(n.target is run_checkpointed for n in traced.graph.nodes)
    assert [r.action for r in bnfx.explain(traced, ghost_batch_size=GHOST)] == ["ghost"]


class CompileRegion(nn.Module):
    """``torch.compiler.nested_compile_region``: Dynamo's ``invoke_subgraph``."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x):
        @torch.compiler.nested_compile_region
        def region(x):
            return self.bn(x)

        return region(x)


class NoGradRegion(nn.Module):
    """``torch.no_grad()`` inside forward: export's training IR puts the region into
    ``wrap_with_set_grad_enabled``."""

    def __init__(self):
        super().__init__()
        self.frozen_input = nn.BatchNorm1d(4)
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x):
        with torch.no_grad():
            x = self.frozen_input(x)
        return self.bn(x)


@pytest.mark.parametrize("door", ["compile", "export"])
@pytest.mark.parametrize("model_class", [CompileRegion, NoGradRegion])
def test_other_higher_order_regions(model_class, door):
    torch.manual_seed(0)
    model = model_class()
    reference = chunk_loop_model(model, GHOST)
    x = torch.randn(10, 4)
    if door == "compile":
        first = len(compile_backend.graph_reports)
        out = torch.compile(model, backend=bnfx.backend(ghost_batch_size=GHOST, inner="aot_eager"))(x)
        records = [r for report in compile_backend.graph_reports[first:] for r in report]
        state = model.state_dict()
    else:
        program = torch.export.export(model, (x,))
        records = list(bnfx.explain(program, ghost_batch_size=GHOST))
        module = bnfx.transform(program, ghost_batch_size=GHOST).module()
        out = module(x)
        state = module.state_dict()
    expected = reference(x)
    assert {r.action for r in records} == {"ghost"} and len(records) == len(list(model.children())), records
    torch.testing.assert_close(out, expected)
    for key, value in unwrapped_state(reference).items():
        torch.testing.assert_close(state[key], value, msg=key)


class CheckpointedNormAct(nn.Module):
    """NormAct layers (their own forward, one with momentum=None) in checkpointed regions."""

    def __init__(self, use_reentrant: bool):
        super().__init__()
        self.blocks = nn.ModuleList(
            [nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), BatchNormAct2d(3, momentum=momentum)) for momentum in (0.1, None)]
        )
        self.use_reentrant, self.checkpointing = use_reentrant, True

    def forward(self, x):
        for block in self.blocks:
            x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=self.use_reentrant) if self.checkpointing else block(x)
        return x


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_transformed_norm_act_regions_update_their_state_once_a_step(use_reentrant):
    model = CheckpointedNormAct(use_reentrant).double()
    reference = chunk_loop_model(without_checkpointing(copy.deepcopy(model)), GHOST)
    rewritten = bnfx.transform(model, ghost_batch_size=GHOST)
    for batch in (10, 8):
        x = torch.randn(batch, 3, 5, 5, dtype=torch.float64, requires_grad=True)
        out = rewritten(x)
        out.backward(torch.ones_like(out))
        torch.testing.assert_close(out, reference(x))
    expected = unwrapped_state(reference)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, expected[key], msg=key)
