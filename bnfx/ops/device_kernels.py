"""The device kernels this installation has: the C++ CPU extension (built at install time,
optional) and the Triton CUDA kernels (where Triton imports). The ops register them with
``register_kernel``; where one is missing, that device runs the op's default body."""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
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
    """The C++ extension (its AVX2 build where the CPU has AVX2), or None. Which one loaded, or
    why none did, is one log line: INFO where it was not built, WARNING where a build fails to
    load."""
    names = ["bnfx.ops._cpu_kernels"]
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        names.insert(0, "bnfx.ops._cpu_kernels_avx2")
    for name in names:
        if importlib.util.find_spec(name) is None:
            continue
        try:
            module = importlib.import_module(name)
        except ImportError as error:
            log.warning("bnfx: the C++ CPU kernels %s were built but fail to load (%s)", name, error)
            continue
        return module
    log.info("bnfx: no C++ CPU kernels (none built that loads, e.g. no C++ compiler at install): CPU tensors run "
             "the ops' PyTorch default bodies")
    return None


def kernel_table() -> list[tuple[str, str, str]]:
    """``(device, kernel, what it takes)`` for bnfx's ghost and sync ops in this install:
    which kernel serves them on each device, and why (``python -m bnfx.ops`` prints it)."""
    extension = cpu_extension()
    if extension is not None:
        cpu = f"C++ kernels ({extension.__name__.rpartition('.')[2]})"
        cpu_takes = "contiguous float32/float64; other input: the default bodies"
    else:
        cpu, cpu_takes = "the ops' PyTorch default bodies: the C++ extension is not built or does not load", "any"
    if triton_launchers() is not None:
        cuda, cuda_takes = "Triton kernels", "float32/float16/bfloat16; float64: the default bodies"
    else:
        cuda, cuda_takes = "the ops' PyTorch default bodies: Triton does not import", "any"
    if not torch.cuda.is_available():
        cuda += " (no CUDA device here)"
    return [("cpu", cpu, cpu_takes), ("cuda", cuda, cuda_takes)]


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
