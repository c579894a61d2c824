"""What each rank of the collective-order tests runs (spawned processes import this module).

Models with batch norms on parallel branches (a compiler may run either first) trained on
uneven rank batches, through compilers that schedule them differently on each rank; the
reference is one process on the concatenated batch, in float64.
"""

from __future__ import annotations

import copy
import time

import torch
import torch.distributed as dist
from torch import fx, nn

import bnfx

TOL = dict(rtol=1e-6, atol=1e-7)


class Branchy(nn.Module):
    """A stem, then two branches from the same input (the short one with one batch norm, the
    long one with two), added, then one more batch norm: resnet's block in small."""

    def __init__(self, channels: int = 3, width: int = 4) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.short = nn.Sequential(nn.Conv2d(width, width, 1), nn.BatchNorm2d(width))
        self.long = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width),
        )
        self.head = nn.BatchNorm2d(width)

    def forward(self, x):
        x = self.stem(x)
        return self.head(torch.relu(self.short(x) + self.long(x)))


def model(name: str) -> tuple[nn.Module, tuple[int, ...]]:
    """The float64 model called ``name`` and its sample shape."""
    torch.manual_seed(0)
    if name == "resnet18":
        import torchvision

        net = torchvision.models.resnet18(num_classes=5)
        shape = (3, 32, 32)
    elif name == "mlp":  # (torch.compile's convolution backward fails on an empty batch: torch's own bug)
        net = nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 3), nn.BatchNorm1d(3))
        shape = (6,)
    else:
        net, shape = Branchy(), (3, 6, 6)
    with torch.no_grad():  # statistics that are not the defaults, so that every update shows
        for m in net.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
    return net.double(), shape


def reordering(rank: int):
    """A backend that schedules independent nodes differently on each rank (even ranks in
    program order, odd ranks the latest ready node first), then runs the graph eagerly."""

    def backend(gm: fx.GraphModule, example_inputs):
        nodes = list(gm.graph.nodes)
        waiting = {n: len(set(n.all_input_nodes)) for n in nodes}
        order = [n for n in nodes if n.op == "placeholder"]  # the inputs keep their places
        ready = [n for n in nodes if waiting[n] == 0 and n.op != "placeholder"]
        for node in order:
            for user in node.users:
                waiting[user] -= 1
                if waiting[user] == 0:
                    ready.append(user)
        while ready:
            node = ready.pop(-1 if rank % 2 else 0)
            order.append(node)
            for user in node.users:
                waiting[user] -= 1
                if waiting[user] == 0 and user.op != "output":
                    ready.append(user)
        order.append(next(n for n in nodes if n.op == "output"))  # after every side effect
        # side effects (the statistics' in-place writes) keep their place after what they read
        graph, env = fx.Graph(), {}
        for node in order:
            env[node] = graph.node_copy(node, lambda n: env[n])
        gm.graph = graph
        gm.recompile()
        return gm.forward

    return backend


def compiled(net: nn.Module, door: str, rank: int) -> nn.Module:
    """``net`` (a plain float64 model) made sync through ``door``."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch._dynamo.reset()
    if door == "convert-inductor":
        return torch.compile(bnfx.convert(net, sync=True))
    if door == "convert-max-autotune":
        return torch.compile(bnfx.convert(net, sync=True), mode="max-autotune-no-cudagraphs")
    if door == "ddp-convert-inductor":
        return torch.compile(DDP(bnfx.convert(net, sync=True)))
    if door == "convert-reordering":
        return torch.compile(bnfx.convert(net, sync=True), backend=reordering(rank))
    if door == "backend-inductor":
        return torch.compile(net, backend="bnfx", options={"sync": True})
    if door == "ddp-backend-inductor":
        return torch.compile(DDP(net), backend="bnfx", options={"sync": True})
    if door == "backend-reordering":
        return torch.compile(net, backend="bnfx", options={"sync": True, "inner": reordering(rank)})
    raise ValueError(door)


def _share(sizes, rank) -> slice:
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def steps_equal(rank: int, world_size: int, name: str, door: str, layouts) -> None:
    """One SGD step per layout (each rank's batch size) through ``door`` equals one process
    on the concatenated batch: outputs, input gradients, then every parameter and buffer."""
    reference, shape = model(name)
    plain = copy.deepcopy(reference)
    net = compiled(plain, door, rank)
    ddp = door.startswith("ddp")
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (plain, reference)]
    for step, sizes in enumerate(layouts):
        generator = torch.Generator().manual_seed(step)
        x_all = torch.randn(sum(sizes), *shape, generator=generator, dtype=torch.float64)
        x_ref = x_all.clone().requires_grad_()
        out_ref = reference(x_ref)
        dy = torch.randn(out_ref.shape, generator=generator, dtype=torch.float64)
        out_ref.backward(dy)
        mine = _share(sizes, rank)
        x = x_all[mine].clone().requires_grad_()
        out = net(x)
        out.backward(dy[mine] * (world_size if ddp else 1))  # DDP averages the gradients
        at = f"{name} through {door}, batches {sizes}, rank {rank}"
        torch.testing.assert_close(out, out_ref[mine], **TOL, msg=lambda m: f"{at}: output\n{m}")
        scale = world_size if ddp else 1
        torch.testing.assert_close(x.grad, x_ref.grad[mine] * scale, **TOL, msg=lambda m: f"{at}: input grad\n{m}")
        if not ddp:
            for p in plain.parameters():
                dist.all_reduce(p.grad)
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()
        expected = dict(list(reference.named_parameters()) + list(reference.named_buffers()))
        for key, value in list(plain.named_parameters()) + list(plain.named_buffers()):
            torch.testing.assert_close(value, expected[key], **TOL, msg=lambda m: f"{at}: {key}\n{m}")


def inductor_code(rank: int, world_size: int, mode: str) -> list[str]:
    """Inductor's generated code for one training step of a converted model (default backend)."""
    from torch._inductor.utils import run_and_get_code

    net, shape = model("branchy")
    options = {"sync": True} if mode == "sync" else {"ghost_batch_size": 2}
    compiled = torch.compile(bnfx.convert(net, **options))
    x = torch.randn(4, *shape, dtype=torch.float64)

    def step():
        out = compiled(x)
        out.backward(torch.randn_like(out))

    _, code = run_and_get_code(step)
    return code


def mismatched(rank: int, world_size: int, mismatch: str) -> dict[str, object]:
    """Ranks that run different programs: what each raises (its message) and how long it took."""
    net, shape = model("branchy")
    start = time.monotonic()
    try:
        if mismatch == "different-models":  # the second convert of the process: compared too
            bnfx.convert(model("branchy")[0], sync=True)
            if rank == 1:
                net.long[1] = nn.Identity()
            net = bnfx.convert(net, sync=True)
        elif mismatch == "compiled-reordered-against-eager":
            # a site skipped on one rank: its peers pair their next collective with another site's
            bnfx.convert(net, sync=True)
            if rank == 1:
                net.long[1].forward = lambda x: x
            net = torch.compile(net, backend="aot_eager") if rank == 0 else net
        elif mismatch == "backend-against-convert":
            converted = bnfx.convert(model("branchy")[0], sync=True)  # (the ranks' conversions agree)
            if rank == 0:
                net = torch.compile(net, backend="bnfx", options={"sync": True, "inner": "aot_eager"})
            else:
                net = converted
                net.short[1].forward = lambda x: x
        x = torch.randn(3 + rank, *shape, dtype=torch.float64)
        out = net(x)
        out.backward(torch.ones_like(out))
    except Exception as error:  # noqa: BLE001 - the test reads it
        return {"error": f"{type(error).__name__}: {error}", "seconds": time.monotonic() - start}
    return {"error": None, "seconds": time.monotonic() - start}
