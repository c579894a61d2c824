"""Per-call cost of each bnfx op against torch.batch_norm, on tiny input where it dominates.

Forward and backward with a dense upstream gradient, the state written back as rewritten
graphs do; every variant interleaved round by round in one process, after a warm-up. The sync
ops run in a gloo group of one process, so they pay their all-reduce (the floor row: the same
all-reduces alone, with torch's batch norm).

    python benchmarks/per_call.py [--shape 8,16] [--reps 2000]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from machine import describe
from tabulate import tabulate

import bnfx
import bnfx.functional


def variants(x: torch.Tensor) -> dict:
    channels = x.shape[1]
    modules = {name: torch.nn.BatchNorm1d(channels) if x.dim() == 2 else torch.nn.BatchNorm2d(channels)
               for name in ("plain", "ghost", "sync", "module", "floor")}

    def state(bn):
        return dict(running_mean=bn.running_mean, running_var=bn.running_var, weight=bn.weight, bias=bn.bias)

    def plain(bn=modules["plain"]):
        return F.batch_norm(x, training=True, momentum=0.1, eps=1e-5, **state(bn))

    def ghost(bn=modules["ghost"]):
        return bnfx.functional.ghost_batch_norm(
            x, **state(bn), ghost_batch_size=max(x.shape[0] // 2, 1), num_batches_tracked=bn.num_batches_tracked
        )

    def sync(bn=modules["sync"]):
        return bnfx.functional.sync_batch_norm(x, **state(bn), num_batches_tracked=bn.num_batches_tracked)

    def module(bn=modules["module"]):
        return bnfx.functional.module_batch_norm(
            x, bn.running_mean, bn.running_var, bn.weight, bn.bias, 0.1, 1e-5,
            group_name=None, num_batches_tracked=bn.num_batches_tracked,
        )

    def floor(bn=modules["floor"]):
        # torch's batch norm plus what sync batch norm must communicate: 2 C + 1 values forward,
        # 2 C backward
        dist.all_reduce(torch.zeros(2 * channels + 1, dtype=torch.float64))
        out = F.batch_norm(x, training=True, momentum=0.1, eps=1e-5, **state(bn))
        out.register_hook(lambda grad: dist.all_reduce(torch.zeros(2 * channels)))
        return out

    return {
        "torch.batch_norm": plain,
        "bnfx::ghost_batch_norm": ghost,
        "bnfx::module_batch_norm": module,
        "torch.batch_norm + sync all-reduces": floor,
        "bnfx::sync_batch_norm": sync,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="8,16", help="input shape, N,C[,H,W] (default 8,16)")
    parser.add_argument("--reps", type=int, default=2000)
    args = parser.parse_args()
    shape = tuple(int(n) for n in args.shape.split(","))

    dist.init_process_group("gloo", init_method=f"file://{tempfile.mktemp()}", rank=0, world_size=1)
    torch.manual_seed(0)
    x = torch.randn(shape, requires_grad=True)
    grad = torch.randn(shape)
    calls = variants(x)
    times = {name: [] for name in calls}
    for round_ in range(args.reps + 200):
        for name, call in calls.items():
            x.grad = None
            start = time.perf_counter()
            call().backward(grad)
            if round_ >= 200:  # warm-up
                times[name].append(time.perf_counter() - start)
    us = {name: statistics.median(t) * 1e6 for name, t in times.items()}
    rows = [
        (name, f"{us[name]:.1f}", f"{us[name] / us['torch.batch_norm']:.2f}",
         f"{us[name] / us['torch.batch_norm + sync all-reduces']:.2f}" if "sync" in name else "")
        for name in calls
    ]
    print(f"forward+backward per call, input {shape}, {torch.get_num_threads()} threads, "
          f"median of {args.reps} interleaved rounds, C++ kernels: {bnfx.ops.device_kernels.cpu_kernels()}")
    print(describe())
    print(tabulate(rows, headers=["op", "us", "/ torch.batch_norm", "/ floor"], tablefmt="simple"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
