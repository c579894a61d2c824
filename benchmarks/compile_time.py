"""The first training step in a fresh process, cold and warm, as ratios to plain torch.compile.

A run is what a training job pays before its first step ends: a new Python process imports
torch, torchvision and bnfx, compiles the model (inductor, forward and backward) and trains
one step (cross-entropy, SGD), timed from the process's start to its exit. Cold: an empty
``TORCHINDUCTOR_CACHE_DIR``; warm: a second process on the same directory (a resumed run,
the next job of a sweep, every rank of a restarted DDP job), served by torch's AOTAutograd
and FX graph caches. Variants:

- one process: plain ``torch.compile(m)``; ``torch.compile(m, backend="bnfx",
  options={"ghost_batch_size": G})``; ``torch.compile(bnfx.convert(m, ghost_batch_size=G))``;
- gloo ranks (``--nproc``, one thread each), every variant under DDP: plain
  ``torch.compile(DDP(m))``; ``backend="bnfx", options={"sync": True}``;
  ``torch.compile(DDP(bnfx.convert(m, sync=True)))``. A run's time is its slowest rank's.

Each round times every variant cold then warm, variants in turn; the table shows medians over
rounds, the ratio to plain of the same kind, and the AOTAutograd cache's hits in the warm run.

    python benchmarks/compile_time.py [--model resnet18] [--batch 16] [--size 32] [--ghost 8]
        [--nproc 2] [--rounds 1] [--skip-sync]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

GHOST_VARIANTS = ["plain", "backend ghost", "convert ghost"]
SYNC_VARIANTS = ["plain DDP", "backend sync", "convert sync"]


def child(args) -> None:
    """One run: import, compile, one training step; prints the cache counters as JSON."""
    import torch
    import torchvision
    from torch.nn.parallel import DistributedDataParallel as DDP

    import bnfx

    if args.world > 1:
        import torch.distributed as dist

        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=args.init, rank=args.rank, world_size=args.world)
    torch.manual_seed(0)
    model = getattr(torchvision.models, args.model)(num_classes=10)
    variant = args.child
    if variant == "backend ghost":
        net = torch.compile(model, backend="bnfx", options={"ghost_batch_size": args.ghost})
    elif variant == "convert ghost":
        net = torch.compile(bnfx.convert(model, ghost_batch_size=args.ghost))
    elif variant == "plain DDP":
        net = torch.compile(DDP(model))
    elif variant == "backend sync":
        net = torch.compile(DDP(model), backend="bnfx", options={"sync": True})
    elif variant == "convert sync":
        net = torch.compile(DDP(bnfx.convert(model, sync=True)))
    else:
        net = torch.compile(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(args.rank)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=generator)
    target = torch.randint(0, 10, (args.batch,), generator=generator)
    torch.nn.functional.cross_entropy(net(x), target).backward()
    optimizer.step()
    from torch._dynamo.utils import counters

    print(json.dumps(dict(counters["aot_autograd"])))
    if args.world > 1:
        dist.destroy_process_group()


def run(variant: str, cache_dir: str, args, world: int) -> tuple[float, dict]:
    """Seconds from the processes' start to the last one's exit, and rank 0's cache counters."""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache_dir}
    if world > 1:
        env["OMP_NUM_THREADS"] = "1"
    with tempfile.TemporaryDirectory() as tmp:
        init = f"file://{os.path.join(tmp, 'rendezvous')}"
        command = [sys.executable, __file__, "--child", variant, "--world", str(world), "--init", init,
                   "--model", args.model, "--batch", str(args.batch), "--size", str(args.size),
                   "--ghost", str(args.ghost)]
        start = time.monotonic()
        procs = [subprocess.Popen([*command, "--rank", str(rank)], env=env, stdout=subprocess.PIPE, text=True)
                 for rank in range(world)]
        outputs = [p.communicate()[0] for p in procs]
        seconds = time.monotonic() - start
    for rank, p in enumerate(procs):
        if p.returncode:
            raise RuntimeError(f"{variant}: rank {rank} exited with {p.returncode}")
    return seconds, json.loads(outputs[0].strip().splitlines()[-1])


def table(variants: list[str], args, world: int) -> None:
    from tabulate import tabulate

    times: dict[str, dict[str, list[float]]] = {v: {"cold": [], "warm": []} for v in variants}
    hits: dict[str, int] = {}
    for _ in range(args.rounds):
        for variant in variants:
            with tempfile.TemporaryDirectory() as cache_dir:
                times[variant]["cold"].append(run(variant, cache_dir, args, world)[0])
                seconds, counters = run(variant, cache_dir, args, world)
                times[variant]["warm"].append(seconds)
                hits[variant] = counters.get("autograd_cache_hit", 0)
    median = {v: {kind: statistics.median(t) for kind, t in kinds.items()} for v, kinds in times.items()}
    plain = median[variants[0]]
    rows = [[v, f"{m['cold']:.1f}", f"{m['cold'] / plain['cold']:.2f}x", f"{m['warm']:.1f}",
             f"{m['warm'] / plain['warm']:.2f}x", hits[v]] for v, m in median.items()]
    ranks = f"{world} gloo ranks" if world > 1 else "one process"
    print(f"\n{args.model}, batch {args.batch}x3x{args.size}x{args.size}, {ranks}, {args.rounds} round(s)")
    print(tabulate(rows, headers=["variant", "cold s", "cold / plain", "warm s", "warm / plain",
                                  "warm AOTAutograd cache hits"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--ghost", type=int, default=8)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--skip-sync", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--world", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--init", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    from machine import describe

    print(describe())
    table(GHOST_VARIANTS, args, 1)
    if not args.skip_sync:
        table(SYNC_VARIANTS, args, args.nproc)


if __name__ == "__main__":
    main()
