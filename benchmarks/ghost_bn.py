"""Ghost batch norm forward+backward: bnfx against plain batch norm and Composer's chunk loop.

Every variant runs on the same input in one process. bnfx and plain batch norm (eager, and
compiled) are interleaved round by round, so their ratios compare like with like; Composer's
chunk loop is timed in rounds of its own, after them: its dozens of small single-threaded
ops slow whatever runs next (by half on a 2-core EPYC, [1024, 256]), which would charge
its cost to the variant after it. Prints medians (ms) and ratios as a table.

    python benchmarks/ghost_bn.py [--reps 15] [--no-compile]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
from machine import describe
from tabulate import tabulate
from torch import nn

import bnfx
import bnfx.functional
from bnfx.chunk_loop import ChunkLoopBatchNorm

SHAPES = [
    ((256, 64, 28, 28), 8),
    ((256, 512, 7, 7), 8),
    ((256, 2048), 8),
    ((1024, 256), 16),
    ((64, 256, 14, 14), 4),
    ((128, 32, 16, 16), 2),
]


def batch_norm_module(shape) -> nn.Module:
    return {2: nn.BatchNorm1d, 4: nn.BatchNorm2d}[len(shape)](shape[1])


class BnfxEager(nn.Module):
    """The bnfx op called eagerly, state written back as the rewritten graphs do."""

    def __init__(self, bn: nn.Module, ghost_batch_size: int):
        super().__init__()
        self.bn, self.ghost_batch_size = bn, ghost_batch_size

    def forward(self, x):
        bn = self.bn
        return bnfx.functional.ghost_batch_norm(
            x, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.momentum, bn.eps,
            ghost_batch_size=self.ghost_batch_size, num_batches_tracked=bn.num_batches_tracked,
        )


def step(fn, x, grad):
    x.grad = None
    fn(x).backward(grad)


def measure(variants: dict, x, grad, reps: int) -> dict[str, float]:
    for fn in variants.values():  # warm up (and compile)
        for _ in range(2):
            step(fn, x, grad)
    times = {name: [] for name in variants}
    for _ in range(reps):
        for name, fn in variants.items():
            start = time.perf_counter()
            step(fn, x, grad)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def geomean(values) -> float:
    values = list(values)
    return math.exp(sum(math.log(v) for v in values) / len(values))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=15, help="timed rounds per variant (default 15)")
    parser.add_argument("--no-compile", action="store_true", help="skip the inductor variants")
    args = parser.parse_args()
    torch.manual_seed(0)

    rows, ratios = [], {"bnfx/plain": [], "loop/plain": [], "bnfx/loop": [], "compiled bnfx/plain": []}
    for shape, g in SHAPES:
        x = torch.randn(shape, requires_grad=True)
        grad = torch.randn(shape)
        variants = {
            "plain": batch_norm_module(shape),
            "bnfx": BnfxEager(batch_norm_module(shape), g),
        }
        if not args.no_compile:
            torch._dynamo.reset()
            variants["compiled plain"] = torch.compile(batch_norm_module(shape), backend="inductor")
            variants["compiled bnfx"] = torch.compile(
                batch_norm_module(shape), backend=bnfx.backend(ghost_batch_size=g, inner="inductor")
            )
        ms = measure(variants, x, grad, args.reps)
        ms |= measure({"loop": ChunkLoopBatchNorm(batch_norm_module(shape), g)}, x, grad, args.reps)
        row = [f"{tuple(shape)}/{g}", ms["plain"], ms["loop"], ms["bnfx"]]
        ratios["bnfx/plain"].append(ms["bnfx"] / ms["plain"])
        ratios["loop/plain"].append(ms["loop"] / ms["plain"])
        ratios["bnfx/loop"].append(ms["bnfx"] / ms["loop"])
        row += [ratios["bnfx/plain"][-1], ratios["loop/plain"][-1], ratios["bnfx/loop"][-1]]
        if not args.no_compile:
            ratios["compiled bnfx/plain"].append(ms["compiled bnfx"] / ms["compiled plain"])
            row += [ms["compiled plain"], ms["compiled bnfx"], ratios["compiled bnfx/plain"][-1]]
        rows.append(row)

    headers = ["shape/ghost", "plain ms", "loop ms", "bnfx ms", "bnfx/plain", "loop/plain", "bnfx/loop"]
    if not args.no_compile:
        headers += ["compiled plain ms", "compiled bnfx ms", "compiled bnfx/plain"]
    geo = ["geomean", "", "", ""] + [geomean(ratios[k]) for k in ("bnfx/plain", "loop/plain", "bnfx/loop")]
    if not args.no_compile:
        geo += ["", "", geomean(ratios["compiled bnfx/plain"])]
    rows.append(geo)
    print(f"fwd+bwd, training mode, medians of {args.reps} interleaved rounds, {torch.get_num_threads()} threads")
    print(describe())
    print(tabulate(rows, headers=headers, floatfmt=".3g"))


if __name__ == "__main__":
    main()
