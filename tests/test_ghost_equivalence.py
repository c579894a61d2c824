"""Ghost batch norm through both doors equals Composer's algorithm: outputs, gradients, state."""

import pytest
import torch
from torch import nn

import bnfx
from bnfx import compile_backend
from bnfx.chunk_loop import chunk_loop_model, unwrapped_state
from composer_reference import assert_steps_equal

STEPS = 3


def make_model(kind: str, momentum, affine: bool, track: bool) -> tuple[nn.Module, tuple[int, ...]]:
    bn = dict(momentum=momentum, affine=affine, track_running_stats=track)
    if kind == "1d-2d":
        layers, shape = [nn.Linear(6, 8), nn.BatchNorm1d(8, **bn), nn.ReLU()], (6,)
    elif kind == "1d-3d":
        layers, shape = [nn.Conv1d(3, 8, 3), nn.BatchNorm1d(8, **bn), nn.ReLU(), nn.AdaptiveAvgPool1d(1)], (3, 10)
    elif kind == "2d":
        layers, shape = [nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8, **bn), nn.ReLU(), nn.AdaptiveAvgPool2d(1)], (3, 8, 8)
    else:
        layers, shape = [nn.Conv3d(3, 8, 3), nn.BatchNorm3d(8, **bn), nn.ReLU(), nn.AdaptiveAvgPool3d(1)], (3, 5, 5, 5)
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(8, 3)), shape


def run_steps(model, batches):
    """SGD steps; returns per step (output, input grad, {param name: grad})."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    records = []
    for x in batches:
        x = x.clone().requires_grad_()
        out = model(x)
        (out.float() ** 2).mean().backward()
        grads = {n.replace("batchnorm.", "").replace("_orig_mod.", ""): p.grad.clone() for n, p in model.named_parameters()}
        records.append((out.detach(), x.grad, grads))
        opt.step()
        opt.zero_grad()
    return records


# kind, batch, ghost size, momentum, affine, track, layout/dtype
CASES = {
    "bn1d-2d-100-32": ("1d-2d", 100, 32, 0.1, True, True, None),
    "bn1d-2d-70-32-momentum-none": ("1d-2d", 70, 32, None, True, True, None),
    "bn1d-3d-70-32": ("1d-3d", 70, 32, 0.1, True, True, None),
    "bn2d-100-32": ("2d", 100, 32, 0.1, True, True, None),
    "bn2d-70-32-momentum-none": ("2d", 70, 32, None, True, True, None),
    "bn3d-70-32": ("3d", 70, 32, 0.1, True, True, None),
    "bn2d-affine-false": ("2d", 70, 32, 0.1, False, True, None),
    "bn2d-no-running-stats": ("2d", 100, 32, 0.1, True, False, None),
    "bn2d-channels-last": ("2d", 100, 32, 0.1, True, True, "channels_last"),
    "bn2d-bf16": ("2d", 70, 32, 0.1, True, True, "bf16"),
}


def bnfx_model(door: str, model: nn.Module, g: int):
    if door == "transform":
        return bnfx.transform(model, ghost_batch_size=g)
    return torch.compile(model, backend="bnfx", options={"ghost_batch_size": g, "inner": "aot_eager"})


@pytest.mark.parametrize("door", ["transform", "compile"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_composer(case, door):
    kind, batch, g, momentum, affine, track, variant = CASES[case]
    torch.manual_seed(0)
    model, shape = make_model(kind, momentum, affine, track)
    batches = [torch.randn(batch, *shape) * 2 + 0.5 for _ in range(STEPS)]
    eval_batch = torch.randn(7, *shape)  # smaller than the ghost size: Composer refuses it
    tol = dict(rtol=1e-4, atol=1e-5)
    if variant == "channels_last":
        model = model.to(memory_format=torch.channels_last)
        batches = [x.contiguous(memory_format=torch.channels_last) for x in batches]
    if variant == "bf16":
        model = model.to(torch.bfloat16)
        batches, eval_batch = [x.bfloat16() for x in batches], eval_batch.bfloat16()
        tol = dict(rtol=3e-2, atol=3e-2)
    reference = chunk_loop_model(model, g)

    ours = bnfx_model(door, model, g)
    got, want = run_steps(ours, batches), run_steps(reference, batches)

    for (out, x_grad, grads), (ref_out, ref_x_grad, ref_grads) in zip(got, want):
        torch.testing.assert_close(out, ref_out, **tol)
        torch.testing.assert_close(x_grad, ref_x_grad, **tol)
        assert grads.keys() == ref_grads.keys()
        for name in grads:
            torch.testing.assert_close(grads[name], ref_grads[name], **tol, msg=name)
    state, ref_state = model.state_dict(), unwrapped_state(reference)
    assert state.keys() == ref_state.keys()
    for key in state:
        torch.testing.assert_close(state[key], ref_state[key], **tol, msg=key)
    if track:
        assert state["1.num_batches_tracked"].item() == STEPS * -(-batch // g)

    ours.eval()
    reference.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(eval_batch), reference(eval_batch), **tol)


@pytest.mark.parametrize("top", ["user class", "nn.Sequential"])
def test_compile_rewrites_momentum_none_modules_in_one_graph(top):
    """torch's forward reads float(num_batches_tracked), where Dynamo would break the graph and
    run the module plain: bnfx gives it a traceable forward, in the forms users write."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn = nn.BatchNorm2d(4, momentum=None)

        def forward(self, x):
            return self.bn(self.conv(x)).relu()

    torch.manual_seed(0)
    # a Sequential of the batch norm alone: Dynamo compiles Sequential.forward, a torch frame
    model = (Net() if top == "user class" else nn.Sequential(nn.BatchNorm2d(3, momentum=None))).double()
    reference = chunk_loop_model(model, 4)
    compile_backend.graph_reports.clear()
    net = torch.compile(model, backend="bnfx", fullgraph=True, options={"ghost_batch_size": 4, "inner": "aot_eager"})
    assert_steps_equal(model, reference, net, [torch.randn(b, 3, 6, 6, dtype=torch.float64) for b in (16, 16, 10)])
    actions = [(r.form, r.action) for report in compile_backend.graph_reports for r in report]
    assert actions and set(actions) == {("bnfx.module_batch_norm", "ghost")}
