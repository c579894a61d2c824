"""The CUDA (Triton) kernels on ResNet-50's batch-norm shapes: bytes moved, and speed where
a GPU is present.

Batch norm is memory-bound: per tensor of S bytes the floor is 3 S forward (the statistics
read x, the normalization reads x and writes y) and 5 S backward (the sums read dy and x,
the input gradient reads dy and x and writes dx). The shapes are those of torchvision's
ResNet-50 at the given batch (traced on the meta device), in fp16/bf16, NCHW and
channels_last.

- With a GPU: each kernel's achieved GB/s and its fraction of the device's measured copy
  bandwidth; bnfx against torch's batch norm (plain, one chunk) and ghost batch norm against
  Composer's chunk loop, forward + backward with a dense upstream gradient, variants
  interleaved, medians.
- Without one: the bytes each kernel moves and its time at ``--bandwidth`` (a roofline).

    python benchmarks/kernels.py [--batch 256] [--ghost 32] [--bandwidth 3000] [--reps 20]
"""

from __future__ import annotations

import argparse
import collections
import statistics

import torch
import torchvision
from machine import describe
from tabulate import tabulate

import bnfx
import bnfx.functional
from bnfx.chunk_loop import ChunkLoopBatchNorm
from bnfx.ops import ghost_chunk_layout

# passes over a tensor's bytes each kernel makes
KERNEL_PASSES = {"moments": 1, "normalize": 2, "backward_sums": 2, "backward_input": 3}
FORWARD, BACKWARD = ("moments", "normalize"), ("backward_sums", "backward_input")
# the goal: each direction within 85% of the copy bandwidth's floor
EFFICIENCY_GOAL = 0.85


def resnet50_batch_norm_shapes(batch: int) -> list[tuple[tuple[int, ...], int]]:
    """``[(input shape, how many layers have it)]`` of torchvision's ResNet-50 at ``batch``."""
    model = torchvision.models.resnet50().to("meta")
    seen = collections.Counter()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.register_forward_hook(lambda m, args, out: seen.update([tuple(args[0].shape)]))
    model(torch.empty(batch, 3, 224, 224, device="meta"))
    return sorted(seen.items(), key=lambda item: -item[0][1] * item[0][2] * item[0][3])


def roofline(shapes, dtypes, bandwidth_gbs: float) -> None:
    rows = []
    itemsize = {d.itemsize for d in dtypes}.pop()  # fp16 and bf16 move the same bytes
    for shape, layers in shapes:
        size = torch.Size(shape).numel() * itemsize
        row = [str(shape), layers, "/".join(str(d).removeprefix("torch.") for d in dtypes), size / 1e6]
        row += [KERNEL_PASSES[k] * size / bandwidth_gbs / 1e3 for k in KERNEL_PASSES]
        row += [3 * size / bandwidth_gbs / 1e3, 5 * size / bandwidth_gbs / 1e3]
        rows.append(row)
    print(
        f"No GPU: bytes each kernel moves, and its time (us) at {bandwidth_gbs:g} GB/s; NCHW and channels_last, "
        "plain and ghost (one launch for all chunks) move the same bytes"
    )
    headers = ["input", "layers", "dtype", "S (MB)"] + [f"{k} us" for k in KERNEL_PASSES] + ["fwd 3S us", "bwd 5S us"]
    print(describe())
    print(tabulate(rows, headers=headers, floatfmt=".4g"))


def cuda_time_us(fn, reps: int) -> float:
    """Median of ``reps`` timings of ``fn`` with CUDA events, after a warm-up."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def copy_bandwidth_gbs(reps: int) -> float:
    x = torch.empty(1 << 28, dtype=torch.float32, device="cuda")  # 1 GiB
    y = torch.empty_like(x)
    return 2 * x.numel() * 4 / cuda_time_us(lambda: y.copy_(x), reps) / 1e3


def kernel_table(shapes, dtypes, layouts, bandwidth: float, reps: int) -> None:
    from bnfx.ops.triton import launchers

    rows = []
    for (shape, _), dtype, layout in ((s, d, m) for s in shapes for d in dtypes for m in layouts):
        x = torch.randn(shape, device="cuda", dtype=dtype).to(memory_format=layout)
        dy = torch.randn_like(x)
        chunk = shape[0]
        mean, m2 = launchers.moments(x, chunk)
        scale = torch.rsqrt(m2 / x[:, 0].numel()).float()
        coefficient = torch.ones_like(scale)
        calls = {
            "moments": lambda: launchers.moments(x, chunk),
            "normalize": lambda: launchers.normalize(x, mean, scale, None, chunk),
            "backward_sums": lambda: launchers.backward_sums(dy, x, mean, chunk),
            "backward_input": lambda: launchers.backward_input(dy, x, mean, coefficient, coefficient, coefficient, chunk),
        }
        size = x.numel() * x.element_size()
        times = {name: cuda_time_us(call, reps) for name, call in calls.items()}
        row = [str(shape), str(dtype).removeprefix("torch."), _layout_name(layout), size / 1e6]
        for name, us in times.items():
            gbs = KERNEL_PASSES[name] * size / us / 1e3
            row += [gbs, gbs / bandwidth]
        for direction, passes in ((FORWARD, 3), (BACKWARD, 5)):
            floor = passes * size / (EFFICIENCY_GOAL * bandwidth) / 1e3
            row.append(sum(times[k] for k in direction) / floor)
        rows.append(row)
    headers = ["input", "dtype", "layout", "S (MB)"]
    for name in KERNEL_PASSES:
        headers += [f"{name} GB/s", "of copy"]
    headers += ["fwd / goal", "bwd / goal"]
    print(f"Triton kernels, one chunk; copy bandwidth {bandwidth:.0f} GB/s; goal: fwd <= 3S/(0.85 B), bwd <= 5S/(0.85 B)")
    print(describe())
    print(tabulate(rows, headers=headers, floatfmt=".3g"))


def against_torch(shapes, dtypes, layouts, ghost: int, reps: int) -> None:
    rows = []
    for (shape, _), dtype, layout in ((s, d, m) for s in shapes for d in dtypes for m in layouts):
        x = torch.randn(shape, device="cuda", dtype=dtype).to(memory_format=layout).requires_grad_()
        dy = torch.randn_like(x)  # dense upstream gradient
        bn = torch.nn.BatchNorm2d(shape[1], device="cuda")
        loop = ChunkLoopBatchNorm(torch.nn.BatchNorm2d(shape[1], device="cuda"), ghost)

        def bnfx_step(g):
            out = bnfx.functional.ghost_batch_norm(
                x, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.momentum, bn.eps, ghost_batch_size=g,
                num_batches_tracked=bn.num_batches_tracked,
            )
            out.backward(dy)

        variants = {
            "torch": lambda: bn(x).backward(dy),
            "bnfx plain": lambda: bnfx_step(shape[0]),
            "loop": lambda: loop(x).backward(dy),
            "bnfx ghost": lambda: bnfx_step(ghost),
        }
        times = {name: [] for name in variants}
        for _ in range(reps):  # interleaved rounds
            for name, fn in variants.items():
                times[name].append(cuda_time_us(fn, 1))
        us = {name: statistics.median(t) for name, t in times.items()}
        chunks = ghost_chunk_layout(shape[0], ghost)
        rows.append([
            str(shape), str(dtype).removeprefix("torch."), _layout_name(layout), f"{ghost} ({chunks[1]} chunks)",
            us["torch"], us["bnfx plain"], us["bnfx plain"] / us["torch"],
            us["loop"], us["bnfx ghost"], us["bnfx ghost"] / us["loop"], us["bnfx ghost"] / us["bnfx plain"],
        ])
    headers = ["input", "dtype", "layout", "ghost", "torch us", "bnfx us", "bnfx/torch", "loop us", "ghost us",
               "ghost/loop", "ghost/plain"]
    print(f"fwd+bwd, training mode, medians of {reps} interleaved rounds")
    print(describe())
    print(tabulate(rows, headers=headers, floatfmt=".3g"))


def _layout_name(layout) -> str:
    return "NCHW" if layout == torch.contiguous_format else "NHWC"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--ghost", type=int, default=32, help="ghost batch size (default 32)")
    parser.add_argument("--bandwidth", type=float, default=3000.0,
                        help="GB/s for the roofline without a GPU (default 3000, about an H100 SXM's copy bandwidth)")
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args()
    shapes = resnet50_batch_norm_shapes(args.batch)
    dtypes = [torch.float16, torch.bfloat16]
    if not torch.cuda.is_available():
        roofline(shapes, dtypes, args.bandwidth)
        return
    layouts = [torch.contiguous_format, torch.channels_last]
    bandwidth = copy_bandwidth_gbs(args.reps)
    print(f"{torch.cuda.get_device_name()}: measured copy bandwidth {bandwidth:.0f} GB/s")
    kernel_table(shapes, dtypes, layouts, bandwidth, args.reps)
    against_torch(shapes, dtypes, layouts, args.ghost, args.reps)


if __name__ == "__main__":
    main()
