"""Sync batch norm in a resnet18 training step: bnfx sync against local batch norm.

Spawns gloo processes on CPU, one thread each, each pinned to its own core where there are
enough. Both variants train under DistributedDataParallel on the same synthetic batches,
interleaved step by step, each timed step starting after a barrier. Prints rank 0's median
step times, the median over rounds of each round's ratio to local batch norm (the two steps
of a round run back to back, so slow phases of the machine cancel), and the gloo
collectives per step (torch.profiler's ``gloo:`` events).

    python benchmarks/sync_bn.py [--nproc 2] [--batch 16] [--size 224] [--reps 10] [--compile]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torchvision
from machine import describe
from tabulate import tabulate
from torch.nn.parallel import DistributedDataParallel as DDP

import bnfx
from bnfx.torch_internals import resolve_process_group


@torch.library.custom_op("bnfx_benchmarks::sync_point", mutates_args=())
def sync_point(weight: torch.Tensor, group_name: str) -> torch.Tensor:
    """A batch-norm layer's weight, after the all-reduce sync batch norm's forward makes (2 C + 1
    float64 values); its gradient's backward makes the backward's (2 C float32 values). Opaque
    to torch.compile, so compiled models make the same collectives at the same places."""
    dist.all_reduce(torch.zeros(2 * weight.numel() + 1, dtype=torch.float64), group=resolve_process_group(group_name))
    return weight.clone()


@sync_point.register_fake
def _(weight, group_name):
    return torch.empty_like(weight)


@torch.library.custom_op("bnfx_benchmarks::sync_point_backward", mutates_args=())
def sync_point_backward(grad: torch.Tensor, group_name: str) -> torch.Tensor:
    """``grad``, after the all-reduce sync batch norm's backward makes (an op of its own, so
    that compiled backward graphs keep it opaque too)."""
    dist.all_reduce(torch.zeros(2 * grad.numel()), group=resolve_process_group(group_name))
    return grad.clone()


@sync_point_backward.register_fake
def _(grad, group_name):
    return torch.empty_like(grad)


def _sync_point_backward(ctx, grad):
    return sync_point_backward(grad, ctx.group_name), None


def _keep_group_name(ctx, inputs, output):
    ctx.group_name = inputs[1]


sync_point.register_autograd(_sync_point_backward, setup_context=_keep_group_name)


class _SyncPoint(torch.nn.Module):
    def __init__(self, group_name: str):
        super().__init__()
        self.group_name = group_name

    def forward(self, weight):
        return sync_point(weight, self.group_name)


def with_sync_points(model: torch.nn.Module, group) -> torch.nn.Module:
    """Local batch norm plus, at every batch-norm layer, the collectives sync batch norm needs
    (an all-reduce of 2C+1 float64 values forward, of 2C float32 values backward): the cost
    of synchronizing alone, a floor for any sync batch norm with one collective per direction.
    The collectives ride on each layer's weight (a parametrization: the weight as the layer
    reads it), where a backward hook on the layer's output would not run in a compiled model,
    and cost a copy of C values."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            if module.weight is None:
                raise ValueError(f"with_sync_points needs affine batch-norm layers, got {module}")
            torch.nn.utils.parametrize.register_parametrization(module, "weight", _SyncPoint(group.group_name))
    return model


def make_variants(args) -> dict:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    local, synced, floor = copy.deepcopy(model), copy.deepcopy(model), copy.deepcopy(model)
    variants = {
        "local batch norm": DDP(local),
        "local + sync collectives only": DDP(with_sync_points(floor, dist.new_group())),
        "bnfx sync (transform)": DDP(bnfx.transform(synced, sync=True)),
    }
    if args.compile:
        variants["local batch norm, inductor"] = torch.compile(DDP(copy.deepcopy(model)))
        variants["bnfx sync, inductor"] = torch.compile(
            DDP(copy.deepcopy(model)), backend="bnfx", options={"sync": True}
        )
    return variants


def train_step(net, optimizer, x, target):
    optimizer.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(net(x), target).backward()
    optimizer.step()


def gloo_collectives(fn) -> int:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for event in prof.events() if event.name.startswith("gloo:"))


def worker(rank: int, world_size: int, init: str, args, results) -> None:
    torch.set_num_threads(1)
    if os.cpu_count() >= world_size:
        os.sched_setaffinity(0, {rank})  # no migrations: steadier per-layer times on every rank
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world_size)
    variants = make_variants(args)
    optimizers = {name: torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9) for name, net in variants.items()}
    generator = torch.Generator().manual_seed(rank)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=generator)
    target = torch.randint(0, 10, (args.batch,), generator=generator)

    def step(name):
        return lambda: train_step(variants[name], optimizers[name], x, target)

    for name in variants:  # warm up (and compile)
        for _ in range(2):
            step(name)()
    collectives = {name: gloo_collectives(step(name)) for name in variants}
    times = {name: [] for name in variants}
    for _ in range(args.reps):
        for name in variants:
            dist.barrier()
            start = time.perf_counter()
            step(name)()
            times[name].append(time.perf_counter() - start)
    if rank == 0:
        results.put({name: (t, collectives[name]) for name, t in times.items()})
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=2, help="gloo processes (default 2)")
    parser.add_argument("--batch", type=int, default=16, help="samples per process (default 16)")
    parser.add_argument("--size", type=int, default=224, help="image height and width (default 224)")
    parser.add_argument("--reps", type=int, default=10, help="timed steps per variant (default 10)")
    parser.add_argument("--compile", action="store_true", help="add inductor-compiled variants (slow to compile)")
    args = parser.parse_args()

    context = mp.get_context("spawn")
    results = context.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init = f"file://{os.path.join(tmp, 'rendezvous')}"
        procs = [context.Process(target=worker, args=(r, args.nproc, init, args, results)) for r in range(args.nproc)]
        for p in procs:
            p.start()
        measured = results.get(timeout=3600)
        for p in procs:
            p.join()

    rows = []
    for name, (times, collectives) in measured.items():
        base = measured["local batch norm, inductor" if "inductor" in name else "local batch norm"][0]
        ratio = statistics.median(t / b for t, b in zip(times, base))
        rows.append((name, f"{statistics.median(times) * 1e3:.1f}", f"{ratio:.3f}", collectives))
    print(
        f"resnet18 train step (SGD), DDP over {args.nproc} gloo processes x 1 thread, "
        f"{args.batch}x3x{args.size}x{args.size} per process, median of {args.reps}"
    )
    print(describe())
    print(tabulate(rows, headers=["variant", "step ms", "/ local (per round)", "gloo collectives"], tablefmt="simple"))


if __name__ == "__main__":
    main()
