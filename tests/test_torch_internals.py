"""The private torch APIs bnfx uses: each one missing (simulated here, in a subprocess or by
patching) gives one WARNING naming what no longer works and the door that still does; a torch
outside the tested versions warns at import."""

import logging
import pathlib
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import bnfx
from bnfx import torch_internals

PYPROJECT = pathlib.Path(__file__).resolve().parent.parent / "pyproject.toml"


def _import_bnfx_after(setup: str, then: str = "") -> str:
    """stderr of a fresh interpreter that runs ``setup``, imports bnfx, then runs ``then``."""
    script = textwrap.dedent(setup) + "\nimport bnfx\n" + textwrap.dedent(then)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stderr


def test_the_declared_torch_range_is_pyprojects():
    requirement = re.search(r'dependencies = \["torch>=(\d+)\.(\d+),<(\d+)\.(\d+)"', PYPROJECT.read_text())
    low, high = torch_internals.SUPPORTED_TORCH
    assert requirement and tuple(map(int, requirement.groups())) == (*low, *high)


@pytest.mark.parametrize("version,warns", [("2.15.0", True), ("2.13.1+cpu", True), ("2.14.1+cu130", False)])
def test_a_torch_outside_the_range_warns_once_at_import(version, warns):
    stderr = _import_bnfx_after(f"import torch; torch.__version__ = {version!r}", "import bnfx")
    message = f"bnfx: torch {version} is outside the versions bnfx is tested with (>=2.14,<2.15)"
    assert stderr.count(message) == (1 if warns else 0), stderr


@pytest.mark.parametrize(
    "setup,message,door",
    [
        ("import torch; del torch._C._current_graph_task_id",
         "has no torch._C._current_graph_task_id", "bnfx.transform (which keeps checkpointed regions)"),
        ("""
         import torch.fx
         init = torch.fx.Graph.__init__
         def without_tracer(self, *args, **kwargs):
             init(self, *args, **kwargs)
             del self._tracer_cls
         torch.fx.Graph.__init__ = without_tracer
         """, "has no fx.Graph._tracer_cls", "export it"),
        ("import torch.distributed.distributed_c10d as c10d; del c10d._resolve_process_group",
         "has no torch.distributed.distributed_c10d._resolve_process_group", "pass the ProcessGroup itself"),
        ("""
         import torch.export
         def init(self, root, graph, graph_signature, state_dict, range_constraints, module_call_graph):
             pass
         torch.export.ExportedProgram.__init__ = init
         """, "has no torch.export.ExportedProgram(root=, graph=", "bnfx.convert(model, ...) before torch.export"),
        ("import torch.library; del torch.library.Library._destroy",
         "has no torch.library.Library._destroy", "the ops themselves are unaffected"),
        ("import torch, types; torch.ops._c10d_functional = types.SimpleNamespace()",
         "has no torch.ops._c10d_functional.all_reduce", "sync batch norm runs as one opaque op"),
    ],
    ids=["graph-task-id", "tracer-class", "resolve-process-group", "exported-program", "library-destroy",
         "functional-collectives"],
)
def test_a_missing_internal_is_one_warning_with_the_door_that_works(setup, message, door):
    stderr = _import_bnfx_after(setup)
    [line] = [line for line in stderr.splitlines() if "bnfx: this torch" in line]
    assert message in line and door in line


def test_without_functional_collectives_inductor_keeps_the_sync_op_whole():
    stderr = _import_bnfx_after(
        "import torch, types; torch.ops._c10d_functional = types.SimpleNamespace()",
        "from bnfx.ops import DECOMPOSITIONS; print(sorted(str(op) for op in DECOMPOSITIONS), file=__import__('sys').stderr)",
    )
    assert "bnfx.ghost_batch_norm.default" in stderr and "bnfx.sync_batch_norm" not in stderr, stderr


def test_missing_dynamo_internals_are_one_warning_at_the_backends_first_use():
    stderr = _import_bnfx_after(
        "import torch._dynamo.convert_frame as convert_frame; del convert_frame._compile",
        "bnfx.backend(ghost_batch_size=4); bnfx.backend(ghost_batch_size=2)",
    )
    [line] = [line for line in stderr.splitlines() if "bnfx: this torch" in line]
    assert "Dynamo compile-start callbacks or convert_frame._compile" in line
    assert "bnfx.convert(model, ...) and bnfx.transform work without it" in line


def test_an_unreadable_group_timeout_is_said(caplog, monkeypatch):
    monkeypatch.setattr(torch_internals, "_timeout_unreadable_said", False)
    with caplog.at_level(logging.WARNING, logger="bnfx"):
        assert torch_internals.group_timeout(object()) is None
    assert "bnfx's sync communicator waits torch's default timeout, not your group's" in caplog.text


def test_a_watcher_that_cannot_inspect_a_frame_warns(caplog, monkeypatch):
    from bnfx import frame_watch

    def changed(_frame):
        raise RuntimeError("Dynamo's convert_frame._compile no longer names its locals frame and compiler_fn")

    monkeypatch.setattr(torch_internals, "dynamo_compiling", changed)
    monkeypatch.setattr(frame_watch, "_said", set())
    torch._dynamo.reset()
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    with caplog.at_level(logging.WARNING, logger="bnfx"):
        torch.compile(model, backend=bnfx.backend(ghost_batch_size=2, inner="eager"))(torch.randn(4, 3))
    [record] = [r for r in caplog.records if "could not inspect the frame Dynamo compiles" in r.getMessage()]
    assert record.levelname == "WARNING" and "bnfx.convert(model, ...) and bnfx.transform work" in record.getMessage()
