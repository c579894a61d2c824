"""Whole training steps with ghost and sync batch norm, as ratios to plain batch norm.

A step is zero_grad, forward, cross-entropy backward and SGD (momentum 0.9): sync_bn.py's
``train_step``. Cross-entropy's gradient (softmax minus one-hot) is dense at every logit, so
every backward does the work a real step does. Models: torchvision resnet18 and
mobilenet_v3_small (10 classes) on [batch, 3, size, size] images, and an MLP
(Linear(256, 512)-BatchNorm1d-ReLU-Linear(512, 512)-BatchNorm1d-ReLU-Linear(512, 10)) on
[batch, 256].

1. Ghost, one process: plain eager against ghost eager (``bnfx.convert(model,
   ghost_batch_size=G)``), and plain compiled (inductor) against ghost compiled
   (``bnfx.backend(ghost_batch_size=G, inner="inductor")``) and against the converted model
   compiled by torch.compile's default backend (``torch.compile(bnfx.convert(model,
   ghost_batch_size=G))``, what Lightning and timm users do). Every variant trains on the same
   batch; after 2 warm-up steps each (compiles happen there) every round runs each variant
   once, back to back: --reps rounds, or more where rounds are short (--seconds of them).
   Prints each variant's median step and the median over rounds of each round's ghost/plain
   ratio, eager and compiled (slow phases of the machine cancel).
2. Sync, spawned gloo processes, one thread each (each pinned to its own core where there are
   enough), every variant under DDP: local batch norm; the floor, local batch norm plus the
   collectives sync batch norm needs (sync_bn.with_sync_points); ``bnfx.convert(model,
   sync=True)``; and compiled, the floor under inductor against ``torch.compile(DDP(model),
   backend="bnfx", options={"sync": True})`` and against ``torch.compile(DDP(bnfx.convert(model,
   sync=True)))`` (the default backend). Each timed step starts after a barrier. Prints
   rank 0's median step, the median per-round ratio to the floor and to local batch norm
   (compiled rows: to the compiled floor only), and the gloo collectives per step.

    python benchmarks/model_step.py [--models resnet18 mobilenet_v3_small mlp] [--batch 32]
        [--size 64] [--ghost 8] [--reps 10] [--seconds 20] [--nproc 2] [--no-compile] [--skip-ghost]
        [--skip-sync]
"""

from __future__ import annotations

import argparse
import copy
import functools
import math
import os
import queue
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torchvision
from machine import describe
from sync_bn import gloo_collectives, train_step, with_sync_points
from tabulate import tabulate
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import bnfx

MLP_FEATURES = 256
MODELS = {
    "resnet18": lambda: torchvision.models.resnet18(num_classes=10),
    "mobilenet_v3_small": lambda: torchvision.models.mobilenet_v3_small(num_classes=10),
    "mlp": lambda: nn.Sequential(
        nn.Linear(MLP_FEATURES, 512), nn.BatchNorm1d(512), nn.ReLU(),
        nn.Linear(512, 512), nn.BatchNorm1d(512), nn.ReLU(),
        nn.Linear(512, 10),
    ),
}


def make_model(name: str) -> nn.Module:
    torch.manual_seed(0)  # the same initial model in every variant and on every rank
    return MODELS[name]()


def make_batch(name: str, args, generator: torch.Generator):
    shape = (args.batch, MLP_FEATURES) if name == "mlp" else (args.batch, 3, args.size, args.size)
    return torch.randn(shape, generator=generator), torch.randint(0, 10, (args.batch,), generator=generator)


def training_steps(variants: dict, x, target) -> dict:
    """A training step per variant, each with its own optimizer, all on the same batch."""
    steps = {}
    for name, net in variants.items():
        optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
        steps[name] = functools.partial(train_step, net, optimizer, x, target)
    return steps


def warm_up(steps: dict) -> None:
    """Runs every step twice (compiles happen here)."""
    for step in steps.values():
        step()
        step()


def round_count(steps: dict, args, before_each=lambda: None, agree=lambda n: n) -> int:
    """--reps rounds, more where a round is short: --seconds of rounds at least, so that cheap
    steps (the MLP's, whose gloo collectives jitter by several percent) get enough rounds for a
    stable median. ``agree``: the count every process runs (the sync ranks take their largest)."""
    start = time.perf_counter()
    for step in steps.values():
        before_each()
        step()
    return agree(max(args.reps, math.ceil(args.seconds / (time.perf_counter() - start))))


def largest_over_ranks(n: int) -> int:
    count = torch.tensor([n])
    dist.all_reduce(count, op=dist.ReduceOp.MAX)
    return int(count.item())


def interleaved_times(steps: dict, reps: int, before_each=lambda: None) -> dict[str, list[float]]:
    times = {name: [] for name in steps}
    for _ in range(reps):
        for name, step in steps.items():
            before_each()
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return times


def median_ms(times: list[float]) -> float:
    return statistics.median(times) * 1e3


def per_round_ratio(times: list[float], base: list[float] | None) -> float | None:
    return None if base is None else statistics.median(t / b for t, b in zip(times, base))


def ghost_variants(model: nn.Module, args) -> dict:
    variants = {
        "plain eager": model,
        "ghost eager": bnfx.convert(copy.deepcopy(model), ghost_batch_size=args.ghost),
    }
    if not args.no_compile:
        variants["plain compiled"] = torch.compile(copy.deepcopy(model), backend="inductor")
        variants["ghost compiled"] = torch.compile(
            copy.deepcopy(model), backend=bnfx.backend(ghost_batch_size=args.ghost, inner="inductor")
        )
        converted = bnfx.convert(copy.deepcopy(model), ghost_batch_size=args.ghost)
        variants["convert then compiled"] = torch.compile(converted)
    return variants


def ghost_row(name: str, args) -> list:
    x, target = make_batch(name, args, torch.Generator().manual_seed(0))
    steps = training_steps(ghost_variants(make_model(name), args), x, target)
    warm_up(steps)
    rounds = round_count(steps, args)
    times = interleaved_times(steps, rounds)
    row = [name, rounds]
    for mode in ("eager",) if args.no_compile else ("eager", "compiled"):
        plain, ghost = times[f"plain {mode}"], times[f"ghost {mode}"]
        row += [median_ms(plain), median_ms(ghost), per_round_ratio(ghost, plain)]
    if not args.no_compile:
        converted = times["convert then compiled"]
        row += [median_ms(converted), per_round_ratio(converted, times["plain compiled"])]
    return row


def run_ghost(args) -> None:
    rows = [ghost_row(name, args) for name in args.models]
    headers = ["model", "rounds", "plain eager ms", "ghost eager ms", "ghost/plain eager"]
    if not args.no_compile:
        headers += ["plain compiled ms", "ghost compiled ms", "ghost/plain compiled", "convert then compiled ms",
                    "convert then compiled/plain compiled"]
    print(
        f"ghost train step, one process, {torch.get_num_threads()} threads, batch {args.batch} "
        f"({args.batch}x3x{args.size}x{args.size} images, {args.batch}x{MLP_FEATURES} MLP), "
        f"ghost batch {args.ghost}, medians of interleaved rounds"
    )
    print(describe())
    print(tabulate(rows, headers=headers, floatfmt=".3g"))


def sync_variants(name: str, args, floor_group) -> dict:
    model = make_model(name)
    variants = {
        "local": DDP(copy.deepcopy(model)),
        "floor": DDP(with_sync_points(copy.deepcopy(model), floor_group)),
        "sync eager": DDP(bnfx.convert(copy.deepcopy(model), sync=True)),
    }
    if not args.no_compile:
        variants["floor compiled"] = torch.compile(
            DDP(with_sync_points(copy.deepcopy(model), floor_group)), backend="inductor"
        )
        variants["sync compiled"] = torch.compile(
            DDP(copy.deepcopy(model)), backend="bnfx", options={"sync": True}
        )
        variants["convert then compiled"] = torch.compile(DDP(bnfx.convert(copy.deepcopy(model), sync=True)))
    return variants


def measure_sync(name: str, args, floor_group, generator) -> dict:
    """Per variant: (step times, gloo collectives per step), one step time per round."""
    x, target = make_batch(name, args, generator)
    steps = training_steps(sync_variants(name, args, floor_group), x, target)
    warm_up(steps)
    collectives = {variant: gloo_collectives(step) for variant, step in steps.items()}
    rounds = round_count(steps, args, before_each=dist.barrier, agree=largest_over_ranks)
    times = interleaved_times(steps, rounds, before_each=dist.barrier)
    return {variant: (times[variant], collectives[variant]) for variant in steps}


def sync_worker(rank: int, init: str, args, results) -> None:
    torch.set_num_threads(1)
    if os.cpu_count() >= args.nproc:
        os.sched_setaffinity(0, {rank})  # no migrations: steadier step times on every rank
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=args.nproc)
    floor_group = dist.new_group()  # off DDP's group, as bnfx's collectives are
    generator = torch.Generator().manual_seed(rank)  # each rank its own batch
    measured = {name: measure_sync(name, args, floor_group, generator) for name in args.models}
    if rank == 0:
        results.put((describe(), measured))
    dist.destroy_process_group()


def rank0_result(procs, results):
    """What rank 0 sent; exits when a rank died instead, since the others would wait for it."""
    while True:
        try:
            return results.get(timeout=5)
        except queue.Empty:
            if any(p.exitcode not in (None, 0) for p in procs):
                for p in procs:
                    p.kill()
                sys.exit("a sync worker failed (traceback above)")


def sync_rows(name: str, measured: dict) -> list:
    def times_of(variant):  # None where the variant did not run
        return measured[variant][0] if variant in measured else None

    rows = []
    for variant, (times, collectives) in measured.items():
        compiled = variant.endswith("compiled")
        floor = times_of("floor compiled" if compiled else "floor")
        local = None if compiled else times_of("local")
        rows.append([name, variant, len(times), median_ms(times), per_round_ratio(times, floor),
                     per_round_ratio(times, local), collectives])
    return rows


def run_sync(args) -> None:
    context = mp.get_context("spawn")
    results = context.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init = f"file://{os.path.join(tmp, 'rendezvous')}"
        procs = [context.Process(target=sync_worker, args=(r, init, args, results)) for r in range(args.nproc)]
        for p in procs:
            p.start()
        machine, measured = rank0_result(procs, results)
        for p in procs:
            p.join()
    rows = [row for name in args.models for row in sync_rows(name, measured[name])]
    print(
        f"sync train step, DDP over {args.nproc} gloo processes x 1 thread, per process "
        f"{args.batch}x3x{args.size}x{args.size} images, {args.batch}x{MLP_FEATURES} MLP; rank 0, "
        f"medians of interleaved rounds, each step after a barrier"
    )
    print(machine)
    headers = ["model", "variant", "rounds", "step ms", "/ floor (per round)", "/ local (per round)", "gloo collectives"]
    print(tabulate(rows, headers=headers, floatfmt=".3g", missingval=""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--batch", type=int, default=32, help="samples per process (default 32)")
    parser.add_argument("--size", type=int, default=64, help="image height and width (default 64)")
    parser.add_argument("--ghost", type=int, default=8, help="ghost batch size (default 8)")
    parser.add_argument("--reps", type=int, default=10, help="timed rounds at least (default 10)")
    parser.add_argument("--seconds", type=float, default=20.0,
                        help="timed rounds per model for this long at least (default 20)")
    parser.add_argument("--nproc", type=int, default=2, help="gloo processes for sync (default 2)")
    parser.add_argument("--no-compile", action="store_true", help="skip the inductor variants")
    parser.add_argument("--skip-ghost", action="store_true", help="skip the ghost table")
    parser.add_argument("--skip-sync", action="store_true", help="skip the sync table")
    args = parser.parse_args()
    if not args.skip_ghost:
        run_ghost(args)
    if not args.skip_sync:
        run_sync(args)


if __name__ == "__main__":
    main()
