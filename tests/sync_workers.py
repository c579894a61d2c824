"""What each rank of the sync tests runs (spawned processes import this module by name).

The reference is plain torch batch norm on the concatenation of every rank's batch, which
each rank computes for itself from the same seeds.
"""

from __future__ import annotations

import copy
import time
import traceback

import torch
import torch.distributed as dist
from torch import nn

import bnfx
from bnfx import compile_backend

CHANNELS = 3
TOL = dict(rtol=1e-4, atol=1e-4)

# variant -> (module factory, sample shape after (B, C), channels_last)
VARIANTS = {
    "BatchNorm1d": (lambda: nn.BatchNorm1d(CHANNELS), (), False),
    "BatchNorm1d-sequence": (lambda: nn.BatchNorm1d(CHANNELS), (5,), False),
    "BatchNorm2d": (lambda: nn.BatchNorm2d(CHANNELS), (4, 3), False),
    "BatchNorm3d": (lambda: nn.BatchNorm3d(CHANNELS), (2, 3, 2), False),
    "momentum-None": (lambda: nn.BatchNorm2d(CHANNELS, momentum=None), (4, 3), False),
    "affine-False": (lambda: nn.BatchNorm2d(CHANNELS, affine=False), (4, 3), False),
    "track_running_stats-False": (lambda: nn.BatchNorm2d(CHANNELS, track_running_stats=False), (4, 3), False),
    "channels_last": (lambda: nn.BatchNorm2d(CHANNELS), (4, 3), True),
}
DOORS = ("transform", "compile")


def _rank_slice(sizes: list[int], rank: int) -> slice:
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def _randomized(bn: nn.Module, seed: int) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if bn.affine:
            bn.weight.copy_(torch.rand(CHANNELS, generator=generator) + 0.5)
            bn.bias.copy_(torch.randn(CHANNELS, generator=generator))
        if bn.track_running_stats:
            bn.running_mean.copy_(torch.randn(CHANNELS, generator=generator))
            bn.running_var.copy_(torch.rand(CHANNELS, generator=generator) + 0.5)
            bn.num_batches_tracked.fill_(2)
    return bn


def _sync_model(model: nn.Module, door: str, **options) -> nn.Module:
    if door == "transform":
        return bnfx.transform(model, sync=True, **options)
    options = {"sync": True, "inner": "aot_eager", **options}
    return torch.compile(model, backend="bnfx", fullgraph=True, options=options)


def _sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    dist.all_reduce(t)
    return t


def check_variant(rank: int, sizes: list[int], variant: str, door: str, steps: int = 2) -> None:
    """Train ``steps`` steps and evaluate once; raise AssertionError on any difference."""
    factory, sample, channels_last = VARIANTS[variant]
    torch.manual_seed(0)
    reference = _randomized(factory(), seed=1)
    model = nn.Sequential(copy.deepcopy(reference))
    net = _sync_model(model, door)
    model = model[0]
    mine = _rank_slice(sizes, rank)
    for step in range(steps + 1):
        training = step < steps
        reference.train(training)
        model.train(training)
        generator = torch.Generator().manual_seed(100 + step)
        x_all = torch.randn((sum(sizes), CHANNELS) + sample, generator=generator, dtype=torch.float64)
        x_all = (x_all * 2 + 1).float()
        dy_all = torch.randn(x_all.shape, generator=generator)
        if channels_last:
            x_all = x_all.to(memory_format=torch.channels_last)
        x_ref = x_all.clone().requires_grad_()
        out_ref = reference(x_ref)
        out_ref.backward(dy_all)
        x = x_all[mine].clone().requires_grad_()
        out = net(x)
        out.backward(dy_all[mine])
        where = f"{variant} via {door}, step {step} ({'train' if training else 'eval'})"
        torch.testing.assert_close(out, out_ref[mine], **TOL, msg=lambda m: f"{where}: output\n{m}")
        torch.testing.assert_close(x.grad, x_ref.grad[mine], **TOL, msg=lambda m: f"{where}: input grad\n{m}")
        if channels_last and x.numel():
            assert out.is_contiguous(memory_format=torch.channels_last), f"{where}: output lost channels_last"
        for name in ("weight", "bias"):
            ref_param, param = getattr(reference, name), getattr(model, name)
            if ref_param is None:
                continue
            summed = _sum_over_ranks(param.grad)
            torch.testing.assert_close(summed, ref_param.grad, **TOL, msg=lambda m: f"{where}: {name} grad\n{m}")
            param.grad, ref_param.grad = None, None
        for name, ref_buffer in reference.named_buffers():
            buffer = dict(model.named_buffers())[name]
            torch.testing.assert_close(buffer, ref_buffer, **TOL, msg=lambda m: f"{where}: {name}\n{m}")


def equivalence(rank: int, world_size: int, sizes: list[int]) -> dict[str, str | None]:
    """Every variant through both doors: ``{"variant/door": None or the failure}``."""
    failures = {}
    for variant in VARIANTS:
        for door in DOORS:
            torch._dynamo.reset()
            try:
                check_variant(rank, sizes, variant, door)
                failures[f"{variant}/{door}"] = None
            except Exception:  # noqa: BLE001 - reported per case to the parent
                failures[f"{variant}/{door}"] = traceback.format_exc()
    return failures


def conditioning(rank: int, world_size: int) -> dict[str, float]:
    """Running variance of 1e4 + 1e-2 randn, and what raw float32 sums would give."""
    generator = torch.Generator().manual_seed(7)
    x_all = 1e4 + 1e-2 * torch.randn(16, CHANNELS, 8, 8, generator=generator, dtype=torch.float64)
    exact = x_all.var(dim=(0, 2, 3), unbiased=True)
    bn = nn.BatchNorm2d(CHANNELS, momentum=1.0)  # running_var = this batch's unbiased variance
    bnfx.transform(nn.Sequential(bn), sync=True)(x_all.float()[_rank_slice([8, 8], rank)])
    local = x_all.float()[_rank_slice([8, 8], rank)]
    raw = torch.stack([local.sum((0, 2, 3)), (local * local).sum((0, 2, 3))])
    dist.all_reduce(raw)
    n = x_all.numel() / CHANNELS
    raw_var = (raw[1] - raw[0] * raw[0] / n) / (n - 1)
    return {
        "bnfx": ((bn.running_var.double() - exact).abs() / exact).max().item(),
        "raw_float32_sums": ((raw_var.double() - exact).abs() / exact).max().item(),
    }


class ThreeBatchNorms(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(CHANNELS, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.bn2 = nn.BatchNorm2d(4)
        self.bn3 = nn.BatchNorm1d(4)

    def forward(self, x):
        x = self.bn1(self.conv(x)).relu()
        x = self.bn2(x)
        return self.bn3(x.mean((2, 3)))


def _gloo_events(fn) -> int:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for event in prof.events() if event.name.startswith("gloo:"))


def collective_counts(rank: int, world_size: int, door: str) -> dict[str, int]:
    """gloo collectives in one forward, and in one forward + backward, of three sync sites."""
    torch.manual_seed(0)
    net = _sync_model(ThreeBatchNorms(), door)
    x = torch.randn(6, CHANNELS, 5, 5)
    net(x).sum().backward()  # compile first, outside the counts
    forward = _gloo_events(lambda: net(x))
    step = _gloo_events(lambda: net(x).sum().backward())
    return {"forward": forward, "step": step}


def peer_dies(rank: int, world_size: int) -> dict[str, object]:
    """Rank 1 exits after the rewrite, before the first collective; rank 0 must raise, not hang."""
    net = bnfx.transform(nn.Sequential(nn.BatchNorm2d(CHANNELS)), sync=True)
    dist.barrier()
    if rank == 1:
        import os

        os._exit(3)
    start = time.monotonic()
    try:
        net(torch.randn(4, CHANNELS, 2, 2))
    except Exception as error:  # noqa: BLE001 - the point of the test
        return {"raised": type(error).__name__, "message": str(error)[:300], "seconds": time.monotonic() - start}
    return {"raised": None, "seconds": time.monotonic() - start}


def mismatched_ranks(rank: int, world_size: int, mismatch: str, door: str) -> dict[str, object]:
    """Rank 1 rewrites with other options (or a model with one more batch norm): every rank
    must raise when the communicator is created, before any batch-norm collective, and its
    model must stay as it was."""
    layers = [nn.BatchNorm2d(CHANNELS), nn.ReLU()]
    if mismatch == "sites" and rank == 1:
        layers.append(nn.BatchNorm2d(CHANNELS))
    model = nn.Sequential(*layers)
    options = {"sync": True, "freeze": mismatch == "options" and rank == 1}
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(4, CHANNELS, 2, 2)
    start = time.monotonic()
    try:
        if door == "transform":
            bnfx.transform(model, **options)(x)
        else:
            torch.compile(model, backend="bnfx", fullgraph=True, options={**options, "inner": "aot_eager"})(x)
    except Exception as error:  # noqa: BLE001 - the point of the test
        message = str(error)
    else:
        message = None
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0, msg=key)
    return {"message": message, "seconds": time.monotonic() - start}


def _ddp_step_params(rank, world_size, sizes, door, steps=2):
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    reference = ThreeBatchNorms()
    model = copy.deepcopy(reference)
    if door == "transform":
        net = DDP(bnfx.transform(model, sync=True))
    else:
        net = torch.compile(DDP(model), backend="bnfx", options={"sync": True, "inner": "aot_eager"})
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    mine = _rank_slice(sizes, rank)
    for step in range(steps):
        generator = torch.Generator().manual_seed(10 + step)
        x_all = torch.randn(sum(sizes), CHANNELS, 5, 5, generator=generator)
        weights = torch.randn(sum(sizes), 4, generator=generator)
        # DDP averages gradients over ranks: scaling each rank's loss by the world size makes
        # the average the gradient of the loss over the concatenated batch.
        (reference(x_all) * weights).sum().backward()
        ((net(x_all[mine]) * weights[mine]).sum() * world_size).backward()
        ref_opt.step()
        opt.step()
        ref_opt.zero_grad()
        opt.zero_grad()
    for name, ref_value in list(reference.named_parameters()) + list(reference.named_buffers()):
        value = dict(list(model.named_parameters()) + list(model.named_buffers()))[name]
        torch.testing.assert_close(value, ref_value, **TOL, msg=lambda m: f"DDP via {door}: {name}\n{m}")


def ddp(rank: int, world_size: int, door: str) -> None:
    """Two SGD steps under DistributedDataParallel equal two steps on the concatenated batch."""
    _ddp_step_params(rank, world_size, [5, 11], door)


def block_groups(rank: int, world_size: int) -> dict[str, object]:
    """group_size=2 on 4 ranks: statistics over ranks {0, 1} and {2, 3}, each its own."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm2d(CHANNELS))
    net = bnfx.transform(model, sync=True, group_size=2)
    x_all = torch.randn(4, 3, CHANNELS, 4, 4, generator=torch.Generator().manual_seed(3))  # [rank, B, C, H, W]
    out = net(x_all[rank])
    block = x_all[(rank // 2) * 2 : (rank // 2) * 2 + 2].flatten(0, 1)
    reference = nn.BatchNorm2d(CHANNELS)
    expected = reference(block)[(rank % 2) * 3 : (rank % 2) * 3 + 3]
    torch.testing.assert_close(out, expected, **TOL)
    torch.testing.assert_close(model[0].running_var, reference.running_var, **TOL)
    return {"explain": [r.reason for r in bnfx.explain(nn.Sequential(nn.BatchNorm2d(CHANNELS)), group_size=2)]}


def frozen(rank: int, world_size: int, door: str) -> dict[str, object]:
    """freeze=True: running statistics normalize, nothing updates, no collective, no affine grads."""
    torch.manual_seed(rank)
    bn = _randomized(nn.BatchNorm2d(CHANNELS), seed=1)
    state = {k: v.clone() for k, v in bn.state_dict().items()}
    model = nn.Sequential(bn)
    if door == "transform":
        net = bnfx.transform(model, freeze=True)
    else:
        net = torch.compile(model, backend="bnfx", fullgraph=True, options={"freeze": True, "inner": "aot_eager"})
    x = torch.randn(4, CHANNELS, 3, 3, requires_grad=True)
    net(x).sum().backward()  # compile outside the count
    x.grad = None
    events = _gloo_events(lambda: net(x).square().sum().backward())
    expected = nn.functional.batch_norm(
        x.detach(), state["running_mean"], state["running_var"], state["weight"], state["bias"], False, 0.0, bn.eps
    )
    torch.testing.assert_close(net(x), expected, **TOL)
    for key, value in bn.state_dict().items():
        torch.testing.assert_close(value, state[key], msg=f"{key} changed")
    assert x.grad is not None and x.grad.abs().sum() > 0, "input gets no gradient"
    return {"gloo_events": events, "weight_grad": bn.weight.grad, "bias_grad": bn.bias.grad}


def inductor_step(rank: int, world_size: int) -> None:
    """One step through torch.compile's default inner compiler (inductor), ranks of 4 and 6
    samples: inductor compiles the sync op's decomposition, its all-reduces included."""
    from torch._inductor.utils import run_and_get_code

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(CHANNELS, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    reference = copy.deepcopy(model)
    compiled = torch.compile(model, backend="bnfx", options={"sync": True}, fullgraph=True)
    x_all = torch.randn(10, CHANNELS, 6, 6, generator=torch.Generator().manual_seed(1))
    mine = _rank_slice([4, 6], rank)

    def step():
        out = compiled(x_all[mine])
        out.square().sum().backward()
        return out

    out, (forward_code, backward_code) = run_and_get_code(step)
    for code in (forward_code, backward_code):
        assert "torch.ops.bnfx" not in code, "inductor calls a bnfx op instead of its decomposition"
        assert code.count("_c10d_functional.all_reduce") == 1, code
    out_ref = reference(x_all)
    out_ref.square().sum().backward()
    torch.testing.assert_close(out, out_ref[mine], **TOL)
    torch.testing.assert_close(model[1].running_var, reference[1].running_var, **TOL)
    torch.testing.assert_close(_sum_over_ranks(model[0].weight.grad), reference[0].weight.grad, **TOL)


def dynamic_batches(rank: int, world_size: int, batches) -> int:
    """Compiled sync model fed a changing batch size (rank 1 gets 3 samples fewer): each step
    equals plain batch norm on the concatenated batch; returns the graphs Dynamo compiled."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(CHANNELS, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.BatchNorm2d(4, affine=False))
    model = model.double()
    reference = copy.deepcopy(model)
    compiled = torch.compile(model, backend="bnfx", options={"sync": True, "inner": "aot_eager"})
    for step, batch in enumerate(batches):
        sizes = [batch, batch - 3]
        generator = torch.Generator().manual_seed(step)
        x_all = torch.randn(sum(sizes), CHANNELS, 6, 6, generator=generator, dtype=torch.float64)
        grad_all = torch.randn(sum(sizes), 4, 4, 4, generator=generator, dtype=torch.float64)
        mine = _rank_slice(sizes, rank)
        x = x_all[mine].requires_grad_()
        x_ref = x_all.clone().requires_grad_()
        out, out_ref = compiled(x), reference(x_ref)
        out.backward(grad_all[mine])
        out_ref.backward(grad_all)
        torch.testing.assert_close(out, out_ref[mine], **TOL)
        torch.testing.assert_close(x.grad, x_ref.grad[mine], **TOL)
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, **TOL, msg=key)
    return counters["stats"]["unique_graphs"]


def _step_equals_concatenated(net, reference, sizes, rank, sample, outputs, generator) -> None:
    """One forward and backward of ``net`` on this rank's share of a float64 batch equals
    ``reference``'s on the whole batch: output and input grad."""
    x_all = torch.randn(sum(sizes), *sample, generator=generator, dtype=torch.float64)
    grad_all = torch.randn(sum(sizes), outputs, generator=generator, dtype=torch.float64)
    mine = _rank_slice(sizes, rank)
    x, x_ref = x_all[mine].clone().requires_grad_(), x_all.clone().requires_grad_()
    out, out_ref = net(x), reference(x_ref)
    out.backward(grad_all[mine])
    out_ref.backward(grad_all)
    torch.testing.assert_close(out, out_ref[mine], **TOL)
    torch.testing.assert_close(x.grad, x_ref.grad[mine], **TOL)


def converted_sync_batchnorm(rank: int, world_size: int, door: str) -> list:
    """torchvision resnet18 after nn.SyncBatchNorm.convert_sync_batchnorm, ranks of 5 and 11
    samples, float64: outputs, input grads and running statistics equal plain batch norm on
    the concatenated batch (torch's own SyncBatchNorm refuses CPU tensors)."""
    import torchvision

    torch.manual_seed(0)
    reference = torchvision.models.resnet18(num_classes=4).double()
    model = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(reference))
    if door == "transform":
        net = bnfx.transform(model, sync=True)
    elif door == "compile":
        compile_backend.graph_reports.clear()
        net = torch.compile(model, backend="bnfx", fullgraph=True, options={"sync": True, "inner": "aot_eager"})
    else:  # the graph bnfx rewrote, exported: what to do where torch.export cannot trace SyncBatchNorm
        example = torch.randn(5 if rank == 0 else 11, 3, 32, 32, dtype=torch.float64)
        net = torch.export.export(bnfx.transform(model, sync=True), (example,)).module()
    sizes = [5, 11]
    generator = torch.Generator().manual_seed(1)
    _step_equals_concatenated(net, reference, sizes, rank, (3, 32, 32), 4, generator)
    state = net.state_dict() if door == "export" else model.state_dict()
    for key, value in reference.state_dict().items():
        if "running" in key or "num_batches" in key:
            torch.testing.assert_close(state[key], value, **TOL, msg=key)
    if door == "compile":
        return [r.action for report in compile_backend.graph_reports for r in report]
    return [r.action for r in bnfx.explain(model, sync=True).records]


def norm_act(rank: int, world_size: int, door: str) -> list:
    """NormAct layers (float momentum and momentum=None) over ranks of 5 and 11 samples,
    float64, 2 steps: outputs, input grads, parameter grads and running statistics equal
    the same model, its own forward, on the concatenated batch."""
    from norm_act import norm_act_model

    torch.manual_seed(0)
    reference = norm_act_model().double()
    model = copy.deepcopy(reference)
    compile_backend.graph_reports.clear()
    net = _sync_model(model, door)
    sizes = [5, 11]
    generator = torch.Generator().manual_seed(1)
    for _ in range(2):
        _step_equals_concatenated(net, reference, sizes, rank, (3, 8, 8), 5, generator)
        # the reference's loss is every rank's: its parameter grads are the sum over ranks
        for (name, param), ref_param in zip(model.named_parameters(), reference.parameters()):
            torch.testing.assert_close(_sum_over_ranks(param.grad), ref_param.grad, **TOL, msg=name)
        model.zero_grad()
        reference.zero_grad()
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, **TOL, msg=key)
    if door == "compile":
        return [(r.name, r.action) for report in compile_backend.graph_reports for r in report]
    return [(r.name, r.action) for r in bnfx.explain(model, sync=True).records]


def named_groups(rank: int, world_size: int) -> dict[str, object]:
    """sync=ProcessGroup and sync=<its name> over ranks {0, 2} of 3; rank 1 gets plain batch norm."""
    pair = dist.new_group([0, 2])  # every rank calls new_group; rank 1 receives NON_GROUP_MEMBER
    x_all = torch.randn(3, 4, CHANNELS, 3, generator=torch.Generator().manual_seed(5))  # [rank, B, C, L]
    outcomes = {}
    for how in ("group", "name"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.BatchNorm1d(CHANNELS))
        sync = pair if how == "group" or rank == 1 else pair.group_name
        net = bnfx.transform(model, sync=sync)
        out = net(x_all[rank])
        reference = nn.BatchNorm1d(CHANNELS)
        batch = x_all[rank] if rank == 1 else x_all[[0, 2]].flatten(0, 1)
        expected = reference(batch)[: 4] if rank in (0, 1) else reference(batch)[4:]
        torch.testing.assert_close(out, expected, **TOL, msg=lambda m: f"sync={how}: {m}")
        torch.testing.assert_close(model[0].running_var, reference.running_var, **TOL)
        outcomes[how] = bnfx.explain(nn.Sequential(nn.BatchNorm1d(CHANNELS)), sync=sync).records[0].reason
    return outcomes


def exported_sync(rank: int, world_size: int, decomposed: bool) -> None:
    """A torch.export program rewritten with sync=True equals batch norm on the concatenated batch."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(CHANNELS, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    reference = copy.deepcopy(model)
    x_all = torch.randn(11, CHANNELS, 6, 6, generator=torch.Generator().manual_seed(2))
    mine = _rank_slice([5, 6], rank)
    ep = torch.export.export(copy.deepcopy(model), (x_all[mine],))
    if decomposed:
        ep = ep.run_decompositions()
    module = bnfx.transform(ep, sync=True).module()
    out = module(x_all[mine])
    torch.testing.assert_close(out, reference(x_all)[mine], **TOL)
    for key in ("1.running_mean", "1.running_var", "1.num_batches_tracked"):
        torch.testing.assert_close(module.state_dict()[key], reference.state_dict()[key], **TOL, msg=key)


# The forms users write: torch.compile over DDP, whatever the model's structure.


def _form(form: str) -> nn.Module:
    torch.manual_seed(0)
    if form == "sequential":  # torch's own container: Dynamo skips its forward frame under DDP
        return nn.Sequential(
            nn.Conv2d(CHANNELS, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.BatchNorm1d(4),
        )
    if form == "user":
        return ThreeBatchNorms()
    if form.startswith("checkpointed"):
        from checkpointed import CheckpointedBlocks

        return CheckpointedBlocks(CHANNELS, use_reentrant=form.endswith("reentrant"))
    if form == "data-dependent":
        return DataDependent()
    if form == "timm-norm-act":  # BatchNormAct2d layers: batch norm and activation, one module
        import timm

        return timm.create_model("test_efficientnet", num_classes=4)
    import torchvision

    return torchvision.models.resnet18(num_classes=4)


class DataDependent(ThreeBatchNorms):
    """Control flow on the data: no tracer takes it whole (Dynamo breaks its graph there)."""

    def forward(self, x):
        x = self.bn1(self.conv(x)).relu()
        if x.abs().sum() > 0:  # true for the test's data, but only the data says so
            x = self.bn2(x)
        return self.bn3(x.mean((2, 3)))


def compiled_ddp_forms(rank: int, world_size: int, form: str, inner: str, sizes=(5, 3), steps=2) -> int:
    """``torch.compile(DDP(model), backend="bnfx", options={"sync": True, ...})``: ``steps`` SGD
    steps equal steps on the concatenated batch (float64, outputs, input grads, parameters and
    buffers); returns the batch-norm sites bnfx rewrote."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from bnfx import compile_backend

    reference = _form(form).double()
    model = copy.deepcopy(reference)
    if form.startswith("checkpointed"):  # the reference recomputes nothing: it updates its statistics once
        reference.checkpointing = False
    first = len(compile_backend.graph_reports)
    options = {"sync": True} if inner == "inductor" else {"sync": True, "inner": inner}
    compiled = torch.compile(DDP(model), backend="bnfx", options=options)
    _ddp_steps_equal(compiled, model, reference, rank, world_size, sizes, steps, f"{form} via torch.compile(DDP), {inner}")
    return sum(r.rewritten_count for r in compile_backend.graph_reports[first:])


def transformed_ddp_sequential(rank: int, world_size: int) -> None:
    """``DDP(bnfx.transform(model, sync=True))`` with a top-level nn.Sequential."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    reference = _form("sequential")
    model = copy.deepcopy(reference)
    net = DDP(bnfx.transform(model, sync=True))
    mine = _rank_slice([5, 3], rank)
    x_all = torch.randn(8, CHANNELS, 8, 8, generator=torch.Generator().manual_seed(4))
    dy = torch.randn(8, 4, generator=torch.Generator().manual_seed(5))
    out = net(x_all[mine])
    (out * dy[mine]).sum().mul(world_size).backward()
    out_ref = reference(x_all)
    (out_ref * dy).sum().backward()
    torch.testing.assert_close(out, out_ref[mine], **TOL)
    for (name, p), p_ref in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, **TOL, msg=name)
    for (name, b), b_ref in zip(model.named_buffers(), reference.buffers()):
        torch.testing.assert_close(b, b_ref, **TOL, msg=name)


def dynamic_sync(rank: int, world_size: int, inner: str) -> list[tuple[int, int]]:
    """``dynamic=True`` sync, batches changing size every step: ``(found, rewritten)`` per graph."""
    from bnfx import compile_backend

    torch.manual_seed(0)
    reference = ThreeBatchNorms()
    model = copy.deepcopy(reference)
    first = len(compile_backend.graph_reports)
    compiled = torch.compile(model, backend="bnfx", options={"sync": True, "inner": inner}, dynamic=True)
    for step, sizes in enumerate([[5, 3], [6, 4], [4, 7]]):
        generator = torch.Generator().manual_seed(30 + step)
        x_all = torch.randn(sum(sizes), CHANNELS, 5, 5, generator=generator)
        dy = torch.randn(sum(sizes), 4, generator=generator)
        mine = _rank_slice(sizes, rank)
        x_ref, x = x_all.clone().requires_grad_(), x_all[mine].clone().requires_grad_()
        out_ref = reference(x_ref)
        out_ref.backward(dy)
        out = compiled(x)
        out.backward(dy[mine])
        where = f"dynamic=True, {inner}, step {step}, sizes {sizes}"
        torch.testing.assert_close(out, out_ref[mine], **TOL, msg=lambda m: f"{where}: output\n{m}")
        torch.testing.assert_close(x.grad, x_ref.grad[mine], **TOL, msg=lambda m: f"{where}: input grad\n{m}")
        for (name, p), p_ref in zip(model.named_parameters(), reference.parameters()):
            torch.testing.assert_close(_sum_over_ranks(p.grad), p_ref.grad, **TOL, msg=lambda m: f"{where}: {name}\n{m}")
            p.grad, p_ref.grad = None, None
        for (name, b), b_ref in zip(model.named_buffers(), reference.buffers()):
            torch.testing.assert_close(b, b_ref, **TOL, msg=lambda m: f"{where}: {name}\n{m}")
    return [(r.found, r.rewritten_count) for r in compile_backend.graph_reports[first:]]


def explain_on_one_rank(rank: int, world_size: int) -> dict[str, object]:
    """``if rank == 0: print(bnfx.explain(model, sync=True))``: no collective, so no hang."""
    result = {}
    if rank == 0:
        start = time.monotonic()
        report = bnfx.explain(_form("user"), sync=True)
        result = {"seconds": time.monotonic() - start, "details": [r.reason for r in report]}
    dist.barrier()
    return result


def population_statistics(rank: int, world_size: int, sizes: list[int]) -> dict:
    """bnfx.recompute_statistics(sync=True), each rank with its own uneven batches (3 steps,
    this rank's batch size varying per step): equal to one process over every rank's batches."""
    def batches_of(r):
        generator = torch.Generator().manual_seed(10 + r)
        return [torch.randn(max(sizes[r] - step, 0), CHANNELS, 4, generator=generator) * 2 + r for step in range(3)]

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(CHANNELS, 4, 1), nn.BatchNorm1d(4), nn.ReLU(), nn.Conv1d(4, 2, 1), nn.BatchNorm1d(2))
    single = copy.deepcopy(model)
    bnfx.recompute_statistics(model, batches_of(rank), sync=True)
    # one process, every rank's batches as batches of their own
    bnfx.recompute_statistics(single, [x for r in range(world_size) for x in batches_of(r) if len(x)])
    for key, value in single.state_dict().items():
        if "running" in key:
            torch.testing.assert_close(model.state_dict()[key], value, rtol=1e-6, atol=1e-7, msg=key)
    assert model[1].num_batches_tracked.item() == 3
    return {key: value.tolist() for key, value in model.state_dict().items() if "running" in key}


def small_rank_batches(rank: int, world_size: int, variant: str, sizes: list[int]) -> None:
    """``torch.compile(DDP(model), backend="bnfx")`` in sync mode where a rank holds one sample
    (or none) of a legal group batch: two steps equal one process on the concatenated batch."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    factory, sample, _ = VARIANTS[variant]
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Linear(CHANNELS, CHANNELS) if not sample else nn.Identity(), _randomized(factory(), 1))
    reference = reference.double()
    model = copy.deepcopy(reference)
    compiled = torch.compile(DDP(model), backend="bnfx", options={"sync": True, "inner": "aot_eager"})
    mine = _rank_slice(sizes, rank)
    for step in range(2):
        generator = torch.Generator().manual_seed(step)
        x_all = torch.randn(sum(sizes), CHANNELS, *sample, generator=generator, dtype=torch.float64)
        dy = torch.randn(x_all.shape, generator=generator, dtype=torch.float64)
        x, x_ref = x_all[mine].clone().requires_grad_(), x_all.clone().requires_grad_()
        out, out_ref = compiled(x), reference(x_ref)
        out.backward(dy[mine] * world_size)  # DDP averages the ranks' gradients
        out_ref.backward(dy)
        torch.testing.assert_close(out, out_ref[mine], **TOL)
        torch.testing.assert_close(x.grad, x_ref.grad[mine] * world_size, **TOL)
        for (name, param), ref_param in zip(model.named_parameters(), reference.parameters()):
            torch.testing.assert_close(param.grad, ref_param.grad, **TOL, msg=name)
        model.zero_grad()
        reference.zero_grad()
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, **TOL, msg=key)


def converted(rank: int, world_size: int, form: str, variants, sizes=(5, 3), steps=2) -> None:
    """``bnfx.convert(sync=True)`` on ``form`` under DDP, for each ``(order, compiler, watch)``
    of ``variants``: converted before or after wrapping; eager (compiler None) or
    ``torch.compile(backend=compiler)`` ("bnfx": bnfx's backend too); ``watch`` False:
    ``bnfx.frame_watch`` turned off. Each: ``steps`` SGD steps equal one process on the
    concatenated batch (float64)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from bnfx import frame_watch

    for order, compiler, watch in variants:
        frame_watch.enabled = watch
        reference = _form(form).double()
        model = copy.deepcopy(reference)
        if form.startswith("checkpointed"):  # the reference recomputes nothing: it updates its statistics once
            reference.checkpointing = False
        if order == "convert-then-ddp":
            net = DDP(bnfx.convert(model, sync=True))
        else:
            net = bnfx.convert(DDP(model), sync=True)
        torch._dynamo.reset()
        if compiler == "bnfx":
            net = torch.compile(net, backend="bnfx", options={"sync": True, "inner": "aot_eager"})
        elif compiler is not None:
            net = torch.compile(net, backend=compiler)
        where = f"convert {form}, {order}, compiler={compiler}, frame_watch={watch}"
        _ddp_steps_equal(net, model, reference, rank, world_size, sizes, steps, where)
    frame_watch.enabled = True


def _ddp_steps_equal(net, model, reference, rank, world_size, sizes, steps, where) -> None:
    """``steps`` SGD steps of ``net`` (``model`` under DDP) on this rank's share of float64
    batches equal ``reference``'s on the whole batch: outputs, input grads, then parameters and
    buffers after each step."""
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, reference)]
    mine = _rank_slice(list(sizes), rank)
    for step in range(steps):
        generator = torch.Generator().manual_seed(20 + step)
        x_all = torch.randn(sum(sizes), CHANNELS, 8, 8, generator=generator, dtype=torch.float64)
        x_ref = x_all.clone().requires_grad_()
        out_ref = reference(x_ref)
        dy = torch.randn(out_ref.shape, generator=generator, dtype=torch.float64)
        out_ref.backward(dy)
        x = x_all[mine].clone().requires_grad_()
        out = net(x)
        out.backward(dy[mine] * world_size)  # DDP averages: the average is the whole batch's gradient
        at = f"{where}, step {step}"
        torch.testing.assert_close(out, out_ref[mine], msg=lambda m: f"{at}: output\n{m}")
        torch.testing.assert_close(x.grad, x_ref.grad[mine] * world_size, msg=lambda m: f"{at}: input grad\n{m}")
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()
        expected = dict(list(reference.named_parameters()) + list(reference.named_buffers()))
        for name, value in list(model.named_parameters()) + list(model.named_buffers()):
            torch.testing.assert_close(value, expected[name], msg=lambda m: f"{at}: {name}\n{m}")


def cpu_sync_batchnorm_under_ddp(rank: int, world_size: int) -> dict[str, str]:
    """A model from nn.SyncBatchNorm.convert_sync_batchnorm on CPU, converted by bnfx, then
    wrapped in DDP: bnfx's warning, and DDP's error."""
    import logging

    from torch.nn.parallel import DistributedDataParallel as DDP

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("bnfx").addHandler(handler)
    model = nn.SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    bnfx.convert(model, sync=True)
    try:
        DDP(model)
        error = ""
    except ValueError as raised:
        error = str(raised)
    return {"warnings": [r.getMessage() for r in records if r.levelname == "WARNING"], "error": error}


def whole_group_empty(rank: int, world_size: int) -> None:
    """Every rank's share empty: what torch's batch norm gives the empty concatenation, an
    empty output, the statistics as they were, the batch counted, zero affine gradients."""
    for momentum in (0.1, None):
        reference = _randomized(nn.BatchNorm2d(CHANNELS, momentum=momentum), seed=1)
        model = bnfx.convert(copy.deepcopy(reference), sync=True)
        for module in (reference, model):
            x = torch.randn(0, CHANNELS, 3, 3, requires_grad=True)
            out = module(x)
            out.backward(torch.randn_like(out))
            assert out.shape == x.shape and x.grad.shape == x.shape
        for name, want in reference.state_dict().items():
            torch.testing.assert_close(model.state_dict()[name], want, msg=lambda m: f"{name}: {m}")
        torch.testing.assert_close(model.weight.grad, torch.zeros(CHANNELS))
        torch.testing.assert_close(model.bias.grad, torch.zeros(CHANNELS))
