"""The forwards bnfx gives momentum=None and nn.SyncBatchNorm modules in the frames Dynamo
compiles for it: nothing changes for anything else (eager calls, other backends, copies)."""

import copy
import io
import json
import os
import subprocess
import sys

import torch
from torch import nn

import bnfx  # noqa: F401  (registers the "bnfx" backend)

TESTS = os.path.dirname(__file__)


def test_compiles_for_other_backends_trace_as_before_bnfx_was_imported():
    """Graphs, graph breaks and outcome of compiling resnet18 with SyncBatchNorm (a world of
    one), a NormAct model and a momentum=None model for a recording backend: the same in a
    process that never imported bnfx and in one that compiled other instances for bnfx first."""
    records = {}
    for mode in ("plain", "after-bnfx"):
        run = subprocess.run(
            [sys.executable, os.path.join(TESTS, "trace_records.py"), mode],
            capture_output=True, text=True, timeout=300, cwd=TESTS,
        )
        assert run.returncode == 0, run.stderr[-3000:]
        records[mode] = json.loads(run.stdout)
    assert records["plain"]["NormAct"]["graphs"]  # the comparison covers captured graphs
    assert records["after-bnfx"] == records["plain"]


def cumulative_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=None), nn.ReLU()).double()


def train_steps(net, model, steps=3):
    """Outputs, input and parameter grads of ``steps`` steps, then the state."""
    records = []
    generator = torch.Generator().manual_seed(1)
    for batch in (16, 10, 7)[:steps]:
        x = torch.randn(batch, 3, 8, 8, generator=generator, dtype=torch.float64, requires_grad=True)
        out = net(x)
        out.backward(torch.randn(out.shape, generator=generator, dtype=torch.float64))
        records.append((out.detach(), x.grad, [p.grad.clone() for p in model.parameters()]))
        model.zero_grad()
    return records, copy.deepcopy(model.state_dict())


def test_a_module_compiled_for_bnfx_runs_as_torch_does_everywhere_else():
    """After a bnfx compile gave its batch norm a traceable forward: eager calls, a compile for
    another backend (bnfx.module_batch_norm's own implementation), a deepcopy and a pickled
    copy all compute torch's batch norm with its cumulative average."""
    model = cumulative_model()
    reference = copy.deepcopy(model)
    compiled = torch.compile(model, backend="bnfx", options={"ghost_batch_size": 4, "inner": "aot_eager"})
    compiled(torch.randn(8, 3, 8, 8, dtype=torch.float64))
    assert "forward" in vars(model[1])  # the module bnfx compiled has the traceable forward
    model.load_state_dict(reference.state_dict())

    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    copies = {"deepcopy": copy.deepcopy(model), "pickled": torch.load(buffer, weights_only=False)}
    want = train_steps(reference, reference)
    torch.testing.assert_close(train_steps(model, model), want, msg="eager")
    model.load_state_dict(reference_state := cumulative_model().state_dict())
    torch.testing.assert_close(train_steps(torch.compile(model, backend="aot_eager", fullgraph=True), model), want,
                               msg="aot_eager")
    for name, twin in copies.items():
        twin.load_state_dict(reference_state)
        torch.testing.assert_close(train_steps(twin, twin), want, msg=name)


def test_a_dynamo_reset_keeps_the_watcher():
    """After torch._dynamo.reset(), the first frame compiled for bnfx still gets traceable
    forwards: fullgraph compiles a momentum=None model (else Dynamo fails at its float())."""
    from bnfx import frame_watch

    torch._dynamo.reset()
    assert frame_watch._on_compile_start in torch._dynamo.callback_handler.start_callbacks
    model = cumulative_model()
    net = torch.compile(model, backend="bnfx", fullgraph=True, options={"ghost_batch_size": 4, "inner": "eager"})
    net(torch.randn(8, 3, 8, 8, dtype=torch.float64))
    assert model[1].num_batches_tracked.item() == 2  # two ghost batches of 4


def test_freeze_through_compile_freezes_a_traceable_forward_site():
    """freeze=True on bnfx.module_batch_norm: eval-mode output, state bit-identical, no
    weight or bias gradient (its write-backs dropped, not turned into self-copies)."""
    model = cumulative_model()
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    before = copy.deepcopy(model.state_dict())
    expected_model = copy.deepcopy(model).eval()
    options = {"sync": True, "freeze": True, "inner": "aot_eager"}
    net = torch.compile(model, backend="bnfx", fullgraph=True, options=options)
    x = torch.randn(8, 3, 8, 8, dtype=torch.float64)
    out = net(x)
    out.backward(torch.randn_like(out))
    torch.testing.assert_close(out, expected_model(x))
    assert model[1].weight.grad is None and model[1].bias.grad is None
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
