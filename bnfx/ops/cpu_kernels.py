"""The C++ CPU kernels built at install time (``csrc/batch_norm_cpu.cpp``), shared by the ops."""

from __future__ import annotations

import importlib

import torch
from torch import Tensor


def load():
    """The extension module (its AVX2 build where the CPU has AVX2), or None when it was not built."""
    names = ["bnfx.ops._cpu_kernels"]
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        names.insert(0, "bnfx.ops._cpu_kernels_avx2")
    for name in names:
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    return None


def handles(kernels, input: Tensor) -> bool:
    """Whether ``kernels`` (a loaded extension or None) take ``input``: contiguous fp32/fp64 on CPU."""
    return (
        kernels is not None
        and input.device.type == "cpu"
        and input.dtype in (torch.float32, torch.float64)
        and input.is_contiguous()
    )
