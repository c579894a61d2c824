"""Compile every variant of bnfx's Triton kernels ahead of time, for sm_80 and sm_90, without a GPU.

A variant is a kernel with the input dtype and the tile configuration a launcher can choose
(``launchers.all_tile_configs``, ``launchers.all_merge_configs``). ``compile_all`` returns
one ``AotRow`` per variant and target; ``python -m bnfx.ops.triton aot`` prints them as a
table and exits 1 if any failed.

Registers come from the cubin (``cuobjdump --dump-resource-usage``, shipped with Triton):
``CompiledKernel.n_regs`` needs a GPU. Where ``TRITON_INTERPRET=1`` is set, every
``@triton.jit`` function, Triton's own ``tl.cdiv`` and ``tl.sum`` too, became an interpreter
function that cannot be compiled: ``compile_all`` then compiles in a child process without
that variable (``python -m bnfx.ops.triton aot --json PATH``).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import NamedTuple

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

from bnfx.ops.triton import launchers

TARGETS = (80, 90)  # compute capabilities: A100, H100
INPUT_DTYPES = ("fp32", "fp16", "bf16")  # Triton's names for the launchers' input dtypes
CHILD_TIMEOUT_S = 900  # the whole compile in a child process (about a minute on 2 cores)

# Triton type of every kernel argument, by name; "input" is the pointer type of x's dtype
ARG_TYPES = {
    "x_ptr": "input", "dy_ptr": "input", "out_ptr": "input",
    # per (chunk, channel): float64 means and moments, float32 coefficients and sums
    "mean_ptr": "*fp64", "n_ptr": "*fp64", "m2_ptr": "*fp64", "out_mean_ptr": "*fp64", "out_m2_ptr": "*fp64",
    "shift_ptr": "*fp32", "scale_ptr": "*fp32", "a_ptr": "*fp32", "k_ptr": "*fp32", "c_ptr": "*fp32",
    "sum_dy_ptr": "*fp32", "sum_dy_xmu_ptr": "*fp32",
    "part_a_ptr": "*fp32", "part_b_ptr": "*fp32", "out_a_ptr": "*fp32", "out_b_ptr": "*fp32",
    "B": "i32", "C": "i32", "S": "i32", "chunk_size": "i32", "nchunks": "i32", "split": "i32", "stats": "i32",
}


class Variant(NamedTuple):
    kernel: JITFunction
    dtype: str  # "fp32", "fp16", "bf16", or "-" for the merge kernels
    layout: str  # "cf", "cl", or "-"
    constexprs: dict
    num_warps: int


class AotRow(NamedTuple):
    kernel: str
    dtype: str
    layout: str
    tile: str  # BLOCK_ROWS x BLOCK_COLS
    target: str  # "sm_80", "sm_90"
    registers: int | None
    shared_memory: int | None  # bytes
    seconds: float
    result: str  # "ok" or the error


def variants() -> list[Variant]:
    """Every (kernel, input dtype, tile configuration) the launchers can launch."""
    found = []
    for config in launchers.all_tile_configs():
        blocks = {"BLOCK_ROWS": config.block_rows, "BLOCK_COLS": config.block_cols}
        for by_layout in launchers.TILED_KERNELS.values():
            for dtype in INPUT_DTYPES:
                found.append(Variant(by_layout[config.layout], dtype, config.layout, blocks, config.num_warps))
    for config in launchers.all_merge_configs():
        blocks = {"BLOCK_ROWS": config.block_rows, "BLOCK_COLS": config.block_cols}
        for kernel in launchers.MERGE_KERNELS:
            found.append(Variant(kernel, "-", config.layout, blocks, config.num_warps))
    return found


def compile_variant(variant: Variant, capability: int) -> AotRow:
    """Compile one variant for ``sm_<capability>``; failures are reported in the row."""
    start = time.perf_counter()
    registers = shared = None
    try:
        signature = _signature(variant)
        # as the JIT compiles them for tensors from torch's allocator: 16-byte aligned
        # pointers; sizes unspecialized (the launchers' shapes are arbitrary)
        aligned = {(i,): [["tt.divisibility", 16]] for i, kind in enumerate(signature.values()) if kind[0] == "*"}
        source = ASTSource(fn=variant.kernel, signature=signature, constexprs=variant.constexprs, attrs=aligned)
        compiled = triton.compile(
            source, target=GPUTarget("cuda", capability, 32), options={"num_warps": variant.num_warps}
        )
        shared = compiled.metadata.shared
        registers = _registers(compiled.asm["cubin"])
        result = "ok"
    except Exception as error:  # a failed variant is a row, not the end of the run
        result = f"{type(error).__name__}: {str(error).strip().splitlines()[-1] if str(error).strip() else ''}"
    tile = "x".join(str(v) for v in variant.constexprs.values())
    return AotRow(
        variant.kernel.__name__, variant.dtype, variant.layout, tile, f"sm_{capability}",
        registers, shared, time.perf_counter() - start, result,
    )


def compile_all(targets=TARGETS, jobs: int | None = None) -> list[AotRow]:
    """Compile every variant for every target, ``jobs`` at a time (default: the CPU count)."""
    if triton.knobs.runtime.interpret:
        return _compile_in_child(targets, jobs)
    work = [(variant, capability) for capability in targets for variant in variants()]
    jobs = jobs or os.cpu_count() or 1
    # threads: Triton's MLIR passes and ptxas run outside the GIL
    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        return list(pool.map(lambda item: compile_variant(*item), work))


def main(argv=None) -> int:
    from tabulate import tabulate

    parser = argparse.ArgumentParser(prog="python -m bnfx.ops.triton aot", description=__doc__.splitlines()[0])
    parser.add_argument("--target", type=int, action="append", help="compute capability (default: 80 and 90)")
    parser.add_argument("--jobs", type=int, default=None, help="compilations at a time (default: CPU count)")
    parser.add_argument("--json", metavar="PATH", help="write the rows to PATH as JSON (exit 0), no table")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    rows = compile_all(tuple(args.target or TARGETS), args.jobs)
    if args.json:
        with open(args.json, "w") as file:
            json.dump([row._asdict() for row in rows], file)
        return 0
    print(tabulate(
        [(r.kernel, r.dtype, r.layout, r.tile, r.target, r.registers, r.shared_memory, r.result) for r in rows],
        headers=["kernel", "dtype", "layout", "tile", "target", "registers", "shared memory (B)", "result"],
    ))
    failed = sum(r.result != "ok" for r in rows)
    print(f"\n{len(rows)} variants, {failed} failed, {time.perf_counter() - start:.1f} s")
    return 1 if failed else 0


def _compile_in_child(targets, jobs) -> list[AotRow]:
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "rows.json")
        command = [sys.executable, "-m", "bnfx.ops.triton", "aot", f"--json={path}"]
        command += [f"--target={capability}" for capability in targets]
        command += [f"--jobs={jobs}"] if jobs else []
        child = subprocess.run(command, env=env, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
        if child.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed with exit code {child.returncode}:\n{child.stderr}")
        with open(path) as file:
            return [AotRow(**row) for row in json.load(file)]


def _signature(variant: Variant) -> dict[str, str]:
    signature = {}
    for name in variant.kernel.arg_names:
        if name in variant.constexprs:
            signature[name] = "constexpr"
        else:
            kind = ARG_TYPES[name]
            signature[name] = f"*{variant.dtype}" if kind == "input" else kind
    return signature


def _registers(cubin: bytes) -> int:
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        usage = subprocess.run(
            [cuobjdump, "--dump-resource-usage", file.name], capture_output=True, text=True, check=True
        ).stdout
    match = re.search(r"REG:(\d+)", usage)
    if match is None:
        raise RuntimeError(f"no register count in cuobjdump's output: {usage!r}")
    return int(match.group(1))
