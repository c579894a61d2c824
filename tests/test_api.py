"""Options, errors, logging, state and the backend entry point."""

import logging
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import bnfx


@pytest.mark.parametrize(
    "options,error,message",
    [
        ({"ghost_batch_size": 0}, ValueError, "ghost_batch_size must be a positive int, got 0"),
        ({"ghost_batch_size": 2.5}, ValueError, "ghost_batch_size must be a positive int, got 2.5"),
        ({"ghost_batch_size": True}, ValueError, "ghost_batch_size must be a positive int, got True"),
        ({"ghost_batch_size": 8, "sync": True}, ValueError, "exclusive"),
        ({"ghost_size": 8}, TypeError, "unknown bnfx option 'ghost_size'; allowed options: ghost_batch_size"),
        ({"sync": 3}, TypeError, "sync must be a bool"),
        ({"ghost_batch_size": 8, "group_size": 2}, ValueError, "group_size applies to sync mode only"),
        ({"freeze": "yes"}, TypeError, "freeze must be a bool, got 'yes'"),
    ],
)
def test_bad_options_raise_before_anything_changes(options, error, message):
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    gm = bnfx.trace(model)
    code, state = gm.code, {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=message):
        bnfx.transform(gm, **options)
    with pytest.raises(error, match=message):
        bnfx.backend(**options)
    assert gm.code == code
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key])


def test_inner_is_a_backend_option_only():
    with pytest.raises(TypeError, match="unknown bnfx option 'inner'"):
        bnfx.transform(nn.BatchNorm1d(3), inner="eager")
    with pytest.raises(ValueError, match="inner must be one of inductor, aot_eager, eager or a callable, got 'tvm'"):
        bnfx.backend(inner="tvm")


def test_default_mode_without_process_group_is_ghost_32():
    opts = bnfx.resolve_options({})
    assert (opts.mode, opts.ghost_batch_size) == ("ghost", 32)


def test_transform_rejects_non_modules():
    with pytest.raises(TypeError, match="model must be a torch.fx.GraphModule or an nn.Module, got int"):
        bnfx.transform(3)


def test_compiled_training_updates_users_state_dict_under_original_keys(caplog):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    keys = list(model.state_dict())
    before = model[1].running_mean.clone()
    compiled = torch.compile(model, backend="bnfx", options={"ghost_batch_size": 4, "inner": "aot_eager"})
    with caplog.at_level(logging.INFO, logger="bnfx"):
        for _ in range(2):
            compiled(torch.randn(12, 3, 5, 5) + 1).sum().backward()
    assert list(model.state_dict()) == keys
    assert model[1].num_batches_tracked.item() == 2 * 3
    assert not torch.equal(model[1].running_mean, before)
    assert "1 batch-norm sites, 1 rewritten; options ghost_batch_size=4" in caplog.text


def test_backend_name_works_in_a_fresh_interpreter_without_import():
    script = textwrap.dedent(
        """
        import sys, torch
        from torch import nn
        model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
        assert "bnfx" not in sys.modules
        compiled = torch.compile(model, backend="bnfx", options={"ghost_batch_size": 2, "inner": "eager"})
        compiled(torch.randn(6, 3))
        print(int(model[1].num_batches_tracked))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "3"


def test_import_twice_registers_once():
    script = "import torch, bnfx, bnfx.ops; import bnfx; print(hasattr(torch.ops.bnfx, 'ghost_batch_norm'))"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "True", result.stderr


def test_compile_door_reports_bad_options_and_changes_nothing():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    compiled = torch.compile(model, backend="bnfx", options={"ghost_batch_size": 0, "inner": "eager"})
    with pytest.raises(Exception, match="ghost_batch_size must be a positive int, got 0"):
        compiled(torch.randn(6, 3))
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


@pytest.mark.parametrize(
    "options,message",
    [
        ({"mode": "fast"}, "mode must be one of default, reduce-overhead, max-autotune"),
        ({"mode": "max-autotune", "inner": "aot_eager"}, "mode='max-autotune' is inductor's"),
    ],
)
def test_bad_modes_raise(options, message):
    with pytest.raises(ValueError, match=message):
        bnfx.backend(**options)


def test_a_mode_with_options_in_one_call():
    from bnfx.chunk_loop import chunk_loop_model

    model = nn.Sequential(nn.BatchNorm1d(4))
    reference = chunk_loop_model(model, 4)
    x = torch.randn(8, 4)
    # torch.compile's mode beside a bnfx.backend's options, and both in the options of "bnfx"
    by_torch = torch.compile(model, backend=bnfx.backend(ghost_batch_size=4), mode="max-autotune-no-cudagraphs")
    torch.testing.assert_close(by_torch(x), reference(x))
    assert model[0].num_batches_tracked.item() == 2
    torch._dynamo.reset()
    with pytest.raises(Exception, match="mode given twice"):
        torch.compile(model, backend=bnfx.backend(ghost_batch_size=4, mode="max-autotune"), mode="reduce-overhead")(x)
    torch._dynamo.reset()
    options = {"ghost_batch_size": 4, "mode": "max-autotune-no-cudagraphs"}
    torch.testing.assert_close(torch.compile(model, backend="bnfx", options=options)(x), reference(x))


def test_options_from_the_environment_reach_every_graph(monkeypatch, caplog):
    from bnfx import compile_backend
    from bnfx.chunk_loop import chunk_loop_model

    class TwoGraphs(nn.Module):  # a graph break: two graphs, each with a batch norm
        def __init__(self):
            super().__init__()
            self.bn1, self.bn2 = nn.BatchNorm1d(4), nn.BatchNorm1d(4)

        def forward(self, x):
            x = self.bn1(x)
            torch._dynamo.graph_break()
            return self.bn2(x)

    monkeypatch.setenv("BNFX_OPTIONS", "ghost_batch_size=2, inner=aot_eager")
    model = TwoGraphs().double()
    reference = chunk_loop_model(model, 2)
    first = len(compile_backend.graph_reports)
    x = torch.randn(6, 4, dtype=torch.float64)
    with caplog.at_level(logging.INFO, logger="bnfx"):
        torch.testing.assert_close(torch.compile(model, backend="bnfx")(x), reference(x))
    reports = compile_backend.graph_reports[first:]
    assert [r.rewritten_count for r in reports] == [1, 1]
    assert caplog.text.count("rewritten; options ghost_batch_size=2; BNFX_OPTIONS='ghost_batch_size=2, inner=aot_eager'") == 2
    assert model.bn2.num_batches_tracked.item() == 3
    # the code's options override the environment's, key by key
    torch._dynamo.reset()
    model.bn1.reset_running_stats()
    torch.compile(model.bn1, backend=bnfx.backend(ghost_batch_size=3))(x)
    assert model.bn1.num_batches_tracked.item() == 2
    # and the mode as a whole: code in ghost mode takes no sync from the environment
    monkeypatch.setenv("BNFX_OPTIONS", "sync=true,group_size=2,inner=aot_eager")
    opts = bnfx.options.resolve_backend_options({"ghost_batch_size": 3})
    assert (opts.mode, opts.ghost_batch_size, opts.inner) == ("ghost", 3, "aot_eager")


@pytest.mark.parametrize(
    "value,error,message",
    [
        ("ghost_batch_size=0", ValueError, "ghost_batch_size must be a positive int, got 0"),
        ("ghost_batch_size=16,sync=true", ValueError, "exclusive"),
        ("ghost_size=4", TypeError, "unknown bnfx option 'ghost_size'"),
        ("ghost_batch_size", ValueError, "BNFX_OPTIONS must be comma-separated key=value pairs"),
    ],
)
def test_bad_options_from_the_environment_are_the_same_errors(monkeypatch, value, error, message):
    monkeypatch.setenv("BNFX_OPTIONS", value)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=message):
        bnfx.backend()
    torch._dynamo.reset()
    with pytest.raises(Exception, match=message):
        torch.compile(model, backend="bnfx")(torch.randn(6, 3))
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


@pytest.mark.parametrize("name", ["true", "no-such-group"])
def test_a_sync_string_that_names_no_group_raises(name):
    model = nn.Sequential(nn.BatchNorm1d(3))
    with pytest.raises(ValueError, match=f"sync='{name}' names a process group, but no process group is initialized"):
        bnfx.convert(model, sync=name)
    with pytest.raises(ValueError, match="a flag is sync=True or sync=False" if name == "true" else "sync="):
        bnfx.transform(model, sync=name)
    assert "forward" not in vars(model[0])  # nothing converted
