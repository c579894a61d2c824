"""``bnfx.convert``: the model's own batch-norm modules compute bnfx's batch norm, eagerly,
compiled with any backend, exported, copied and pickled; ``bnfx.revert`` undoes it."""

import copy
import io
import logging
import pickle

import pytest
import torch
from torch import nn

import bnfx
from bnfx import compile_backend
from bnfx.chunk_loop import chunk_loop_model, unwrapped_state
from bnfx.convert import conversion_of
from composer_reference import assert_steps_equal, trained
from norm_act import norm_act_model

GHOST = 4


def models():
    torch.manual_seed(0)
    return {
        "1d": nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.BatchNorm1d(4, momentum=None)),
        "2d": nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.BatchNorm2d(4, affine=False)),
        "3d": nn.Sequential(nn.Conv3d(3, 4, 2), nn.BatchNorm3d(4)),
        "norm-act": norm_act_model(),  # subclasses with their own forward, one with momentum=None
    }


SHAPES = {"1d": (3,), "2d": (3, 6, 6), "3d": (3, 4, 4, 4), "norm-act": (3, 8, 8)}


@pytest.mark.parametrize("door", ["eager", "compile"])
@pytest.mark.parametrize("kind", list(SHAPES))
def test_ghost_equals_the_chunk_loop(kind, door):
    model = models()[kind].double()
    reference = chunk_loop_model(model, GHOST)
    keys = list(model.state_dict())
    assert bnfx.convert(model, ghost_batch_size=GHOST) is model
    assert list(model.state_dict()) == keys and all(type(m) is type(r) for m, r in zip(model.modules(), models()[kind].modules()))
    first = len(compile_backend.graph_reports)
    net = model if door == "eager" else torch.compile(model, backend="aot_eager", fullgraph=True)
    inputs = [torch.randn(batch, *SHAPES[kind], dtype=torch.float64) for batch in (10, 8)]
    assert_steps_equal(model, reference, net, inputs)
    model.eval()
    reference.eval()
    torch.testing.assert_close(net(inputs[0]), reference(inputs[0]))
    assert len(compile_backend.graph_reports) == first  # no bnfx backend involved


def test_compiled_with_the_bnfx_backend_nothing_is_rewritten_twice(caplog):
    model = models()["2d"].double()
    reference = chunk_loop_model(model, GHOST)
    bnfx.convert(model, ghost_batch_size=GHOST)
    first = len(compile_backend.graph_reports)
    net = torch.compile(model, backend=bnfx.backend(ghost_batch_size=2, inner="aot_eager"), fullgraph=True)
    with caplog.at_level(logging.INFO, logger="bnfx"):
        assert_steps_equal(model, reference, net, [torch.randn(10, 3, 6, 6, dtype=torch.float64)])
    records = [r for report in compile_backend.graph_reports[first:] for r in report]
    assert [r.action for r in records] == ["ghost", "ghost"] and all(r.earlier for r in records), records
    # what ran, said by the log line and the report alike, and the options that did not apply warned
    assert "2 batch-norm sites, 2 rewritten (2 of them made earlier" in caplog.text
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(f"with ghost_batch_size={GHOST}, which it keeps: this rewrite's ghost_batch_size=2 does not apply"
               in w for w in warnings), warnings
    report = bnfx.explain(model, ghost_batch_size=2)  # the transform door says the same
    assert all(r.reason.startswith(f"made by bnfx.convert: ghost_batch_size={GHOST}; ") for r in report), report
    assert all("does not apply" not in r.reason for r in bnfx.explain(model, ghost_batch_size=GHOST))


def test_convert_twice_then_revert_gives_back_the_original():
    model, untouched = models()["norm-act"], models()["norm-act"]
    bnfx.convert(model, ghost_batch_size=GHOST)
    bnfx.convert(model, ghost_batch_size=GHOST)
    assert all(conversion_of(m).ghost_batch_size == GHOST for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    bnfx.convert(model, ghost_batch_size=2)  # the last options hold
    assert {conversion_of(m).ghost_batch_size for m in model.modules() if conversion_of(m)} == {2}
    bnfx.revert(model)
    assert not any("forward" in vars(m) for m in model.modules())
    x = torch.randn(10, 3, 8, 8)
    torch.testing.assert_close(model(x), untouched(x), rtol=0, atol=0)
    for key, value in untouched.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0, msg=key)


def test_copies_pickles_and_exports():
    model = bnfx.convert(models()["norm-act"].double(), ghost_batch_size=GHOST)
    x = torch.randn(8, 3, 8, 8, dtype=torch.float64)
    for copied in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        twin = copy.deepcopy(model)
        assert all(conversion_of(m) is None or conversion_of(m).ghost_batch_size == GHOST for m in copied.modules())
        torch.testing.assert_close(copied(x), twin(x), rtol=0, atol=0)
        for key, value in twin.state_dict().items():
            torch.testing.assert_close(copied.state_dict()[key], value, rtol=0, atol=0, msg=key)
    program = torch.export.export(copy.deepcopy(model), (x,))
    assert "bnfx.ghost_batch_norm" in str(program.graph)
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    buffer.seek(0)
    loaded = torch.export.load(buffer).module()
    twin = copy.deepcopy(model)
    torch.testing.assert_close(loaded(x), twin(x))
    for key, value in twin.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, msg=key)


def test_bad_options_change_nothing():
    model = models()["2d"]
    with pytest.raises(ValueError, match="ghost_batch_size must be a positive int, got 0"):
        bnfx.convert(model, ghost_batch_size=0)
    assert not any("forward" in vars(m) for m in model.modules())
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        bnfx.convert(3)


# (order, compiler, frame_watch): eager in both orders, inductor (no bnfx backend), and the
# bnfx backend, each order and kind with bnfx's frame watcher on and off somewhere
SYNC_VARIANTS = [
    ("convert-then-ddp", None, True), ("ddp-then-convert", None, False), ("convert-then-ddp", "inductor", False),
    ("ddp-then-convert", "bnfx", True), ("convert-then-ddp", "bnfx", False),
]


@pytest.mark.parametrize("form", ["sequential", "data-dependent", "resnet18", "timm-norm-act"])
def test_sync_under_ddp_equals_one_process(form):
    """2 gloo ranks of 5 and 3 samples, float64, 2 SGD steps per variant: outputs, input grads,
    parameters and buffers equal one process on the concatenated batch."""
    import sync_workers
    from gloo_world import run_world

    if form == "timm-norm-act":
        pytest.importorskip("timm")
    run_world(sync_workers.converted, 2, form, SYNC_VARIANTS, timeout=900)


class Checkpointed(nn.Module):
    """``inner`` run under torch.utils.checkpoint, or not (the reference)."""

    def __init__(self, inner: nn.Module, use_reentrant: bool):
        super().__init__()
        self.inner, self.use_reentrant, self.checkpointing = inner, use_reentrant, True

    def forward(self, x):
        if self.checkpointing:
            return torch.utils.checkpoint.checkpoint(self.inner, x, use_reentrant=self.use_reentrant)
        return self.inner(x)


@pytest.mark.parametrize("door", ["eager", "compile"])
@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("kind", ["2d", "norm-act"])
def test_checkpointed_blocks_update_their_statistics_once_a_step(kind, reentrant, door):
    """Converted batch norms under torch.utils.checkpoint: the backward's recomputation writes
    no state, eagerly too (torch's own batch norm would update twice)."""
    model = Checkpointed(models()[kind], reentrant).double()
    reference = copy.deepcopy(model)
    reference.checkpointing = False
    reference = chunk_loop_model(reference, GHOST)
    bnfx.convert(model, ghost_batch_size=GHOST)
    net = model if door == "eager" else torch.compile(model, backend="aot_eager")
    inputs = [torch.randn(batch, *SHAPES[kind], dtype=torch.float64, requires_grad=True) for batch in (10, 7)]
    assert_steps_equal(model, reference, net, inputs)
    counters = [m.num_batches_tracked.item() for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert counters[0] == 3 + 2  # chunks of the two steps


@pytest.mark.parametrize("form", ["checkpointed", "checkpointed-reentrant"])
def test_sync_checkpointed_blocks_update_once_on_every_rank(form):
    """Converted sync batch norms under torch.utils.checkpoint, 2 ranks under DDP, eager and
    compiled: the recomputation's collectives match on both ranks, and the statistics move
    once a step, as the model without checkpointing."""
    import sync_workers
    from gloo_world import run_world

    variants = [("convert-then-ddp", None, True), ("ddp-then-convert", "aot_eager", True)]
    run_world(sync_workers.converted, 2, form, variants, timeout=600)


def test_cpu_sync_batchnorm_models_get_one_line_saying_what_to_do():
    import sync_workers
    from gloo_world import run_world

    for result in run_world(sync_workers.cpu_sync_batchnorm_under_ddp, 2):
        assert result["error"] == "SyncBatchNorm layers only work with GPU modules"
        [warning] = result["warnings"]
        assert warning.startswith("bnfx: 1 nn.SyncBatchNorm modules on CPU (1), which DistributedDataParallel refuses")
        assert "without nn.SyncBatchNorm.convert_sync_batchnorm" in warning


def test_explain_convert_says_what_convert_would_do_and_changes_nothing():
    model = models()["norm-act"]
    report = bnfx.explain_convert(model, ghost_batch_size=GHOST)
    modules = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert [r.name for r in report] == [name for name, _ in modules] and len(report) > 0
    assert {r.action for r in report} == {"ghost"} and report.rewritten_count == len(modules)
    assert all("its own forward runs" in r.reason for r in report)
    assert "batch-norm sites, %d converted" % len(modules) in str(report)
    assert not any("forward" in vars(m) for m in model.modules())
    plain = bnfx.explain_convert(models()["2d"], sync=True)  # no process group: nothing to synchronize over
    assert [r.action for r in plain] == ["left alone"] * 2 and "no initialized process group" in plain.records[0].reason


def test_exported_and_pickled_models_train_equal_in_a_fresh_process(tmp_path):
    """The exported program (torch.export.save) and the pickled model, loaded in a process that
    imports bnfx, train two SGD steps equal to the converted module here."""
    import os
    import subprocess
    import sys
    import textwrap

    model = bnfx.convert(models()["norm-act"].double(), ghost_batch_size=GHOST)
    torch.manual_seed(1)
    steps = [(torch.randn(8, 3, 8, 8, dtype=torch.float64), torch.randn(8, 5, dtype=torch.float64))  # [N, classes]
             for _ in range(2)]
    torch.save(steps, tmp_path / "steps.pt")
    torch.export.save(torch.export.export(copy.deepcopy(model), (steps[0][0],)), tmp_path / "model.pt2")
    (tmp_path / "model.pkl").write_bytes(pickle.dumps(model))
    script = textwrap.dedent(f"""
        import pickle, torch, bnfx
        from composer_reference import trained
        steps = torch.load({str(tmp_path / 'steps.pt')!r})
        loaded = {{"exported": torch.export.load({str(tmp_path / 'model.pt2')!r}).module(),
                   "pickled": pickle.loads(open({str(tmp_path / 'model.pkl')!r}, "rb").read())}}
        torch.save({{name: trained(module, steps) for name, module in loaded.items()}}, {str(tmp_path / 'out.pt')!r})
    """)
    env = {**os.environ, "PYTHONPATH": os.path.dirname(__file__)}  # the model's classes are the tests'
    subprocess.run([sys.executable, "-c", script], check=True, timeout=300, env=env)
    expected_outputs, expected_state = trained(model, steps)
    for name, (outputs, state) in torch.load(tmp_path / "out.pt").items():
        for output, expected in zip(outputs, expected_outputs):
            torch.testing.assert_close(output, expected, msg=name)
        assert set(state) == set(expected_state), name
        for key, value in expected_state.items():
            torch.testing.assert_close(state[key], value, msg=f"{name}: {key}")


@pytest.mark.parametrize("backend", ["eager", "inductor"])
def test_ghost_compiled_fullgraph_with_other_backends(backend):
    model = models()["norm-act"].double()
    reference = chunk_loop_model(model, GHOST)
    bnfx.convert(model, ghost_batch_size=GHOST)
    net = torch.compile(model, backend=backend, fullgraph=True)
    assert_steps_equal(model, reference, net, [torch.randn(10, *SHAPES["norm-act"], dtype=torch.float64)])


def test_timm_grad_checkpointing_updates_once_a_step():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", num_classes=4).double()
    reference = chunk_loop_model(model, GHOST)
    model.set_grad_checkpointing(True)
    bnfx.convert(model, ghost_batch_size=GHOST)
    assert_steps_equal(model, reference, model, [torch.randn(10, 3, 32, 32, dtype=torch.float64, requires_grad=True)])


@pytest.mark.parametrize("door", ["eager", "compile"])
def test_lazy_modules_initialize_on_their_first_call(door):
    from bnfx.chunk_loop import ChunkLoopBatchNorm

    def lazy_model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.LazyBatchNorm2d(), nn.LazyBatchNorm2d(momentum=None)).double()

    model, reference = lazy_model(), lazy_model()  # uninitialized lazy modules do not deepcopy
    reference[1], reference[2] = (ChunkLoopBatchNorm(reference[i], GHOST) for i in (1, 2))
    bnfx.convert(model, ghost_batch_size=GHOST)
    net = model if door == "eager" else torch.compile(model, backend="aot_eager")
    assert_steps_equal(model, reference, net, [torch.randn(batch, 3, 6, 6, dtype=torch.float64) for batch in (10, 8)])
    assert type(model[1]) is nn.BatchNorm2d and conversion_of(model[1]).ghost_batch_size == GHOST
