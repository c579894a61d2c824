"""The device kernels this installation has: the C++ CPU extension (built at install time,
optional) and the Triton CUDA kernels (where Triton imports). The ops register them with
``register_kernel``; where one is missing, that device runs the op's default body."""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging

import torch
from torch import Tensor

log = logging.getLogger("bnfx")

# device type -> {op: its kernel}
_registered: dict[str, dict] = {}

# what the Triton kernels take; other dtypes (float64) run the default body on CUDA too
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@functools.cache
def cpu_extension():
    """The C++ extension (its AVX2 build where the CPU has AVX2), or None when it was not built."""
    names = ["bnfx.ops._cpu_kernels"]
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        names.insert(0, "bnfx.ops._cpu_kernels_avx2")
    for name in names:
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    return None


def cpu_extension_takes(input: Tensor) -> bool:
    """Whether the C++ kernels take ``input``: contiguous float32/float64."""
    return input.dtype in (torch.float32, torch.float64) and input.is_contiguous()


@functools.cache
def triton_launchers():
    """``bnfx.ops.triton.launchers``, or None where Triton does not import (said once in the log)."""
    try:
        return importlib.import_module("bnfx.ops.triton.launchers")
    except ImportError as error:
        # a warning only where it costs speed: on a machine with a GPU
        level = logging.WARNING if torch.cuda.is_available() else logging.INFO
        log.log(level, "bnfx: Triton is not available (%s): CUDA tensors run the generic PyTorch kernels", error)
        return None


def register(op, device_type: str, kernel) -> None:
    """Register ``kernel`` as ``op``'s kernel for ``device_type`` ("cpu", "cuda")."""
    op.register_kernel(device_type)(kernel)
    _registered.setdefault(device_type, {})[op] = kernel


def registered_kernel(op, device_type: str):
    """The kernel ``op`` runs on ``device_type``, as a plain function (None if it has none):
    tests call the CUDA kernels this way on CPU tensors, in Triton's interpreter."""
    return _registered.get(device_type, {}).get(op)


@contextlib.contextmanager
def default_bodies(device_type: str):
    """Within the block, every bnfx op runs its default body (the PyTorch kernels) on
    ``device_type``: to compare a device kernel with it, or to run without it."""
    with contextlib.ExitStack() as stack:
        for op in _registered.get(device_type, {}):
            stack.enter_context(op.set_kernel_enabled(device_type, False))
        if device_type == "cpu" and cpu_extension() is not None:
            # the ops' C++ autograd kernels compute in C++ too, unless told not to
            cpu_extension().set_fast_path(False)
            stack.callback(cpu_extension().set_fast_path, True)
        yield
