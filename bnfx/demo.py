"""``bnfx demo``: a few training steps of a torchvision model through torch.compile(backend="bnfx").

Ghost mode runs beside the model, in eager mode, the chunk loop of MosaicML Composer's
GhostBatchNorm; sync mode spawns gloo processes and runs beside them, on every rank, plain
batch norm on the concatenation of all ranks' batches. Each step starts the reference from
bnfx's weights and statistics (a random-init network amplifies float rounding from step to
step). Prints a line per step, then a table: sites rewritten, step times (the first one
compiles), losses and the largest output difference.
"""

from __future__ import annotations

import copy
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tabulate import tabulate
from torch import nn

import bnfx
from bnfx import compile_backend
from bnfx.chunk_loop import chunk_loop_model
from bnfx.model_loading import load_model


class _SiteCounter:
    """Batch-norm sites found and rewritten by the backend from now on."""

    def __init__(self):
        self.start = len(compile_backend.graph_reports)

    @property
    def found(self) -> int:
        return sum(r.found for r in compile_backend.graph_reports[self.start :])

    @property
    def rewritten(self) -> int:
        return sum(r.rewritten_count for r in compile_backend.graph_reports[self.start :])


def _model(args) -> nn.Module:
    """The model, its dropout off: two runs of a dropout layer draw different masks, and the
    comparison would measure that, not bnfx."""
    torch.manual_seed(0)
    model = load_model(args.model, num_classes=10)
    dropouts = [m for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
    for dropout in dropouts:
        dropout.p = 0.0
    args.dropout_off = len(dropouts)
    return model


def _train(compiled, model, reference, batches, rank=0, world=1, log=print):
    """Step both models on each batch, ``compiled`` on this rank's share of it, with the
    gradients summed over ranks; rows of (step, loss, reference loss, max diff, seconds)."""
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.01) for m in (model, reference)]
    rows = []
    for step, (x, y) in enumerate(batches):
        reference.load_state_dict(dict(zip(reference.state_dict(), model.state_dict().values())))
        share = len(x) // world
        mine = slice(rank * share, (rank + 1) * share)
        start = time.perf_counter()
        out = compiled(x[mine])
        # each rank's share of the whole batch's mean loss: summed gradients are its gradient
        loss = nn.functional.cross_entropy(out, y[mine]) / world
        loss.backward()
        if world > 1:
            for p in model.parameters():
                dist.all_reduce(p.grad)
        optimizers[0].step()
        seconds = time.perf_counter() - start
        ref_out = reference(x)
        ref_loss = nn.functional.cross_entropy(ref_out, y)
        ref_loss.backward()
        optimizers[1].step()
        for opt in optimizers:
            opt.zero_grad()
        diff = (out.detach() - ref_out.detach()[mine]).abs().max().item()
        total_loss = loss.detach().clone()
        if world > 1:
            dist.all_reduce(total_loss)  # the whole batch's mean loss
        rows.append((step, total_loss.item(), ref_loss.item(), diff, seconds))
        log(f"step {step}: loss {total_loss.item():.4f} (reference {ref_loss.item():.4f}), "
            f"max |out diff| {diff:.3g}, {seconds:.2f} s")
    return rows


def _batches(args, batch):
    generator = torch.Generator().manual_seed(1)
    for _ in range(args.steps):
        x = torch.randn(batch, 3, args.image_size, args.image_size, generator=generator)
        yield x, torch.randint(0, 10, (batch,), generator=generator)


def _print_table(rows, counter, reference_name, args):
    print()
    print(tabulate(
        [(step, loss, ref, diff, seconds) for step, loss, ref, diff, seconds in rows],
        headers=["step", "bnfx loss", f"{reference_name} loss", "max |out diff|", "bnfx step s"],
        floatfmt=".4g",
    ))
    later = [row[4] for row in rows[1:]]
    summary = [
        ("batch-norm sites rewritten", f"{counter.rewritten} of {counter.found}"),
        ("first step, compiling (s)", f"{rows[0][4]:.2f}"),
        ("later steps, median (s)", f"{statistics.median(later):.3f}" if later else "-"),
        ("max |out diff|", f"{max(row[3] for row in rows):.3g}"),
    ]
    print()
    print(tabulate(summary, tablefmt="plain"))
    print(f"(inner compiler {args.inner!r}; reference: {reference_name})")
    if args.dropout_off:
        layers = f"{args.dropout_off} dropout layer{'s' if args.dropout_off > 1 else ''}"
        print(f"({layers} off in both runs: they would draw different masks)")


def run_ghost(args) -> None:
    model = _model(args)
    print(bnfx.explain(model, ghost_batch_size=args.ghost_batch_size))
    print()
    reference = chunk_loop_model(model, args.ghost_batch_size)
    counter = _SiteCounter()
    compiled = torch.compile(
        model, backend="bnfx", options={"ghost_batch_size": args.ghost_batch_size, "inner": args.inner}
    )
    rows = _train(compiled, model, reference, _batches(args, args.batch))
    _print_table(rows, counter, "Composer chunk loop", args)


def run_sync(args) -> None:
    context = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        init = f"file://{os.path.join(tmp, 'rendezvous')}"
        procs = [context.Process(target=_sync_rank, args=(r, args, init)) for r in range(args.nproc)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
    failed = [r for r, p in enumerate(procs) if p.exitcode != 0]
    if failed:
        raise SystemExit(f"bnfx demo: rank(s) {failed} failed")


def _sync_rank(rank: int, args, init: str) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.nproc))
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=args.nproc)
    try:
        model = _model(args)
        reference = copy.deepcopy(model)
        log = print if rank == 0 else (lambda *a, **k: None)
        counter = _SiteCounter()
        compiled = torch.compile(model, backend="bnfx", options={"sync": True, "inner": args.inner})
        log(f"sync batch norm over {args.nproc} gloo processes, {args.batch} samples each")
        batches = _batches(args, args.batch * args.nproc)
        rows = _train(compiled, model, reference, batches, rank, args.nproc, log)
        if rank == 0:
            _print_table(rows, counter, f"plain batch norm on all {args.nproc * args.batch} samples", args)
    finally:
        dist.destroy_process_group()
