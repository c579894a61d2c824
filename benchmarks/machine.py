"""What a benchmark ran on, printed beside its table: figures from two machines differ, and
the line tells them apart."""

from __future__ import annotations

import os
import platform

import torch

import bnfx.ops


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe() -> str:
    """One line: the CPU, its cores and ISA, the bnfx kernels loaded, threads, torch, GPU."""
    kernels = bnfx.ops.device_kernels.cpu_kernels() or "none (the default bodies)"
    line = (f"ran on: {cpu_model()}, {os.cpu_count()} cores, ISA {torch.backends.cpu.get_cpu_capability()}; "
            f"bnfx C++ kernels {kernels}; {torch.get_num_threads()} threads; torch {torch.__version__}")
    if torch.cuda.is_available():
        line += f"; GPU {torch.cuda.get_device_name()}"
    return line
