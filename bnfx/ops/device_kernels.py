"""The device kernels this installation has, and the one way the ops take them.

- CPU: the C++ library (built at install time, optional). Loading it (``cpu_kernels()``, at
  ``import bnfx``) registers the ghost and sync ops' CPU and AutogradCPU kernels with torch's
  dispatcher, from C++ (``csrc/*_cpu.cpp``); they take every CPU call.
- CUDA: the Triton kernels, where Triton imports. Each op module keeps its body and its
  device's local work apart (a ``LocalKernels`` class per device); ``register_local_kernels``
  registers the body around a device's local work as the op's kernel for that device.

Where a device has no kernel, it runs the op's default body (PyTorch ops, any device).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging

import torch
from torch import Tensor

from bnfx import torch_internals

log = logging.getLogger("bnfx")

# device type -> {op: its Python kernel}
_registered: dict[str, dict] = {}

# op name ("ghost_batch_norm", ...) -> its default body (what ``default_bodies("cpu")`` runs)
_default_bodies: dict[str, object] = {}

# what the Triton kernels take; other dtypes (float64) run the default body on CUDA too
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def custom_op(name: str, default_body):
    """The op ``bnfx::name`` (``torch.library.custom_op``) whose default body is ``default_body``.

    Every kernel takes any layout and returns its tensor outputs laid out as the fake kernels
    say (``torch.empty_like(input)``), so the ops are tagged ``flexible_layout``: inductor then
    passes them what its layout optimization made (channels-last convolution outputs), where
    its default for custom ops would copy each input to the strides seen while tracing, and
    each output back."""
    _default_bodies[name] = default_body
    return torch.library.custom_op(
        f"bnfx::{name}", default_body, mutates_args=(), tags=(torch.Tag.flexible_layout,)
    )


@functools.cache
def cpu_kernels() -> str | None:
    """Loads the C++ CPU kernels into the dispatcher (the AVX2 build where the CPU has AVX2) and
    returns the library's name, or None. Which one loaded, or why none did, is one log line:
    INFO where none was built, WARNING where a build fails to load."""
    names = ["_cpu_kernels"]
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        names.insert(0, "_cpu_kernels_avx2")
    for name in names:
        try:
            spec = importlib.util.find_spec(f"bnfx.ops.{name}")
            if spec is None:
                continue
            torch.ops.load_library(spec.origin)
        except (ImportError, OSError) as error:
            log.warning("bnfx: the C++ CPU kernels bnfx.ops.%s were built but fail to load (%s)", name, error)
            continue
        return name
    log.info("bnfx: no C++ CPU kernels (none built that loads, e.g. no C++ compiler at install): CPU tensors run "
             "the ops' PyTorch default bodies")
    return None


def kernel_table() -> list[tuple[str, str, str]]:
    """``(device, kernel, what it takes)`` for bnfx's ghost and sync ops in this install:
    which kernel serves them on each device, and why (``python -m bnfx.ops`` prints it)."""
    if cpu_kernels() is not None:
        cpu = f"C++ kernels ({cpu_kernels()})"
        cpu_takes = "any: float32/float64 directly, float16/bfloat16 in float32, other layouts through a copy"
    else:
        cpu, cpu_takes = "the ops' PyTorch default bodies: the C++ extension is not built or does not load", "any"
    if triton_launchers() is not None:
        cuda, cuda_takes = "Triton kernels", "float32/float16/bfloat16; float64: the default bodies"
    else:
        cuda, cuda_takes = "the ops' PyTorch default bodies: Triton does not import", "any"
    if not torch.cuda.is_available():
        cuda += " (no CUDA device here)"
    return [("cpu", cpu, cpu_takes), ("cuda", cuda, cuda_takes)]


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


def register_local_kernels(device_type: str, local_kernels, *ops_and_bodies) -> None:
    """For each ``(op, body)``: ``body(local_kernels, *args)`` becomes ``op``'s kernel for
    ``device_type`` ("cuda"), the op's body around that device's local work."""
    for op, body in ops_and_bodies:
        kernel = functools.partial(body, local_kernels)
        op.register_kernel(device_type)(kernel)
        _registered.setdefault(device_type, {})[op] = kernel


def local_kernels(device_kernel_set, input: Tensor):
    """A device's local kernels where they take ``input``, else its base class: the default
    body's local work."""
    return device_kernel_set if device_kernel_set.takes(input) else device_kernel_set.__base__


def registered_kernel(op, device_type: str):
    """The Python kernel ``op`` runs on ``device_type``, as a plain function (None if it has
    none): tests call the CUDA kernels this way on CPU tensors, in Triton's interpreter."""
    return _registered.get(device_type, {}).get(op)


@contextlib.contextmanager
def default_bodies(device_type: str):
    """Within the block, every bnfx op runs its default body (the PyTorch kernels) on
    ``device_type``: to compare a device kernel with it, or to run without it."""
    with contextlib.ExitStack() as stack:
        for op in _registered.get(device_type, {}):
            stack.enter_context(op.set_kernel_enabled(device_type, False))
        if device_type == "cpu" and cpu_kernels() is not None:
            # above the C++ kernels for the block; the C++ autograd kernels call down to them
            stack.enter_context(torch_internals.kernels_for_block("bnfx", "CPU", _default_bodies))
        yield
