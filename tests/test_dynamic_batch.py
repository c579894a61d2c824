"""Changing batch sizes (an epoch's short last batch): compiled once for a symbolic batch,
exported with a batch Dim, rewritten programs run every size in range."""

import copy
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters
from torch.export import Dim

import bnfx
import sync_workers
from bnfx.chunk_loop import chunk_loop_model, unwrapped_state
from composer_reference import assert_steps_equal
from gloo_world import run_world
from test_export import LOAD_AND_RUN

BATCHES = (16, 14, 10, 7)  # 4 chunks of 4; 4, 4, 4, 2; 4, 4, 2; 4, 3


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 4 * 4, 6), nn.BatchNorm1d(6, momentum=0.3),
    )


def test_compiled_ghost_model_compiles_once_for_every_batch_size():
    torch._dynamo.reset()
    counters.clear()
    model = small_model().double()
    reference = chunk_loop_model(model, 4)
    compiled = torch.compile(model, backend="bnfx", options={"ghost_batch_size": 4, "inner": "aot_eager"})
    inputs = [torch.randn(batch, 3, 6, 6, dtype=torch.float64) for batch in BATCHES]
    assert_steps_equal(model, reference, compiled, inputs)
    assert counters["stats"]["unique_graphs"] <= 2  # the first compile, then one dynamic one


def test_compiled_sync_model_compiles_once_for_every_batch_size():
    for graphs in run_world(sync_workers.dynamic_batches, 2, BATCHES):
        assert graphs <= 2


@pytest.mark.parametrize("decomposed", [False, True], ids=["training-IR", "decomposed-IR"])
def test_exported_program_with_a_batch_dim_runs_every_size(tmp_path, decomposed):
    model = small_model()
    batch = Dim("batch", min=2, max=64)
    ep = torch.export.export(copy.deepcopy(model), (torch.randn(16, 3, 6, 6),), dynamic_shapes=({0: batch},))
    if decomposed:
        ep = ep.run_decompositions()
    rewritten = bnfx.transform(ep, ghost_batch_size=8)
    program = tmp_path / "model.pt2"
    torch.export.save(rewritten, program)
    reference = chunk_loop_model(model, 8)
    data = {"steps": []}
    for size in (16, 10, 7, 33):  # 2 chunks of 8; 5, 5; one chunk; 7, 7, 7, 7, 5
        x = torch.randn(size, 3, 6, 6)
        data["steps"].append({"x": x, "out": reference(x).detach(), "state": {k: v.clone() for k, v in unwrapped_state(reference).items()}})
    torch.save(data, tmp_path / "expected.pt")
    result = subprocess.run(
        [sys.executable, "-c", LOAD_AND_RUN, str(program), str(tmp_path / "expected.pt")],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]
