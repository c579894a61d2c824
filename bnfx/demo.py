"""A few training steps of torchvision's resnet18 through ``torch.compile(backend="bnfx")``.

Beside it runs the same model in eager mode with the chunk loop of MosaicML Composer's
GhostBatchNorm. Each step starts the chunk loop from bnfx's weights and statistics (a
random-init network amplifies float rounding differences from step to step), and the demo
prints per step the losses, the largest output difference and the step times.

    python -m bnfx.demo [--steps 4] [--batch 48] [--ghost-batch-size 16] [--inner aot_eager]
"""

from __future__ import annotations

import argparse
import time

import torch
import torchvision
from tabulate import tabulate
from torch import nn

import bnfx
from bnfx.chunk_loop import chunk_loop_model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4, help="training steps (default 4)")
    parser.add_argument("--batch", type=int, default=48, help="batch size (default 48)")
    parser.add_argument("--ghost-batch-size", type=int, default=16, help="ghost batch size (default 16)")
    parser.add_argument(
        "--inner", default="aot_eager", choices=["aot_eager", "inductor", "eager"],
        help="compiler after the bnfx passes (default aot_eager; inductor compiles for minutes on 2 cores)",
    )
    args = parser.parse_args(argv)
    if min(args.steps, args.batch, args.ghost_batch_size) < 1:
        parser.error("--steps, --batch and --ghost-batch-size must be positive")

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    reference = chunk_loop_model(model, args.ghost_batch_size)
    print(bnfx.explain(model, ghost_batch_size=args.ghost_batch_size))
    print()

    compiled = torch.compile(
        model, backend="bnfx", options={"ghost_batch_size": args.ghost_batch_size, "inner": args.inner}
    )
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.01) for m in (model, reference)]
    rows = []
    for step in range(args.steps):
        x = torch.randn(args.batch, 3, 64, 64)
        y = torch.randint(0, 10, (args.batch,))
        reference.load_state_dict(dict(zip(reference.state_dict(), model.state_dict().values())))
        results = []
        for m, opt in zip((compiled, reference), optimizers):
            start = time.perf_counter()
            out = m(x)
            loss = nn.functional.cross_entropy(out, y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            results.append((out.detach(), loss.item(), time.perf_counter() - start))
        (out, loss, seconds), (ref_out, ref_loss, ref_seconds) = results
        rows.append([step, loss, ref_loss, (out - ref_out).abs().max().item(), seconds, ref_seconds])
        print(f"step {step}: loss {loss:.4f} (chunk loop {ref_loss:.4f}), {seconds:.2f}s", flush=True)
    print()
    print(
        tabulate(
            rows,
            headers=["step", "bnfx loss", "chunk-loop loss", "max |out diff|", "bnfx s", "chunk-loop s"],
            floatfmt=".4g",
        )
    )
    print(f"(step 0 of bnfx includes compilation with inner={args.inner!r})")


if __name__ == "__main__":
    main()
