"""Eval latency of a folded program (bnfx.fold) against the unfolded one, torchvision resnet18.

Both run the exported program's module eagerly, under no_grad, on the same input, interleaved
round by round after a warm-up. Prints each variant's median time and the median over rounds of
each round's ratio to the unfolded program (the two calls of a round run back to back, so slow
phases of the machine cancel).

    python benchmarks/fold.py [--batch 8] [--size 224] [--reps 20] [--decomposed]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torchvision
from machine import describe
from tabulate import tabulate

import bnfx


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--decomposed", action="store_true", help="fold the decomposed IR")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    x = torch.randn(args.batch, 3, args.size, args.size)
    program = torch.export.export(model, (x,))
    if args.decomposed:
        program = program.run_decompositions()
    report = bnfx.explain_fold(program)
    variants = {"unfolded program": program.module(), "folded program (bnfx.fold)": bnfx.fold(program).module()}

    times = {name: [] for name in variants}
    with torch.no_grad():
        for _ in range(3):  # warm-up
            for module in variants.values():
                module(x)
        for _ in range(args.reps):
            for name, module in variants.items():
                start = time.perf_counter()
                module(x)
                times[name].append(time.perf_counter() - start)

    baseline = times["unfolded program"]
    rows = [
        (name, f"{statistics.median(t) * 1e3:.1f}", f"{statistics.median(a / b for a, b in zip(t, baseline)):.3f}")
        for name, t in times.items()
    ]
    print(f"resnet18 eval, input {tuple(x.shape)}, {torch.get_num_threads()} threads, {args.reps} rounds; "
          f"{report.rewritten_count} of {report.found} batch-norm sites folded")
    print(describe())
    print(tabulate(rows, headers=["variant", "median ms", "ratio to unfolded"], tablefmt="simple"))


if __name__ == "__main__":
    main()
