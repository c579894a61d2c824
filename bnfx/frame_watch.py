"""What bnfx does when Dynamo starts compiling a frame for it: find batch norms no graph will show.

Dynamo calls a backend with the graphs it captured; batch norms that run outside every graph
never reach it. When Dynamo starts compiling a frame for a bnfx backend (a compile-start
callback), bnfx looks at the modules that frame holds:

- momentum=None and nn.SyncBatchNorm: forwards Dynamo cannot trace (it would break the graph
  and run them eagerly, as plain batch norm, or fail): they get a forward it can trace
  (``traceable_forward``), before Dynamo traces the frame. In sync mode every batch-norm
  module gets one: a rank's share of the group's batch may hold one sample, which torch's
  ``F.batch_norm`` refuses while Dynamo traces it.
- DDP: ``torch.compile(DDP(model), backend="bnfx")`` traces DDP's forward, which breaks
  the graph and runs ``self.module(x)`` eagerly inside DDP's ``_inside_ddp_forward``
  context. Dynamo then compiles the inner module's ``forward`` as a frame of its own only
  when that code is not torch's: a user-defined class or a torchvision model reaches bnfx,
  but ``nn.Sequential.forward`` is skipped, and its batch norms would run plain, in no graph.
  Dynamo does compile the forward frame of a torch module that has forward hooks
  (``torch._dynamo.trace_rules.check_verbose``): such an inner module that contains batch
  norm gets a forward pre-hook that changes nothing, and from then on (the same first step)
  its forward is a frame Dynamo compiles for bnfx.

``bnfx.frame_watch.enabled = False`` turns the watcher off (those batch norms then run plain
under the bnfx backend, or break its graph); ``bnfx.convert`` needs no watcher.
"""

from __future__ import annotations

import logging
import sys
import weakref

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel

from bnfx import torch_internals
from bnfx.options import resolve_backend_options
from bnfx.traceable_forward import give_traceable_forwards

log = logging.getLogger("bnfx")
_opened: weakref.WeakSet = weakref.WeakSet()
_said: set[str] = set()  # the kinds of inspection failure already warned about
enabled = True  # False: bnfx looks at no frame Dynamo compiles


def mark_bnfx_backend(fn):
    """Tag a compiler function as bnfx's, for the watcher to recognize its compiles."""
    fn._bnfx_backend = True
    return fn


def watch() -> None:
    """Watch Dynamo's compiles from now on, through ``torch._dynamo.reset()`` too.

    A reset clears Dynamo's callback list, and a bnfx compile that started after it would
    trace batch norms that need a traceable forward without one. So the list becomes one
    whose ``clear`` keeps bnfx's watcher (which acts on bnfx's frames only) and clears every
    other callback as before.
    """
    if not torch_internals.dynamo_frames():
        return
    handler = torch_internals.dynamo_start_callbacks()
    if not isinstance(handler.start_callbacks, _KeepsWatcher):
        handler.start_callbacks = _KeepsWatcher(handler.start_callbacks)
    if _on_compile_start not in handler.start_callbacks:
        handler.register_start_callback(_on_compile_start)


class _KeepsWatcher(list):
    def clear(self) -> None:
        kept = [callback for callback in self if callback is _on_compile_start]
        super().clear()
        self.extend(kept)


def _on_compile_start(_args) -> None:
    if not enabled:
        return
    try:
        frame, options = _frame_compiled_by_bnfx()
        if frame is not None:
            # Sync mode: every batch norm, so that a rank's batch of one sample (a legal part
            # of the group's batch) traces; torch's F.batch_norm refuses it while Dynamo traces
            every_module = _sync_mode(options)
            for module in _modules_in(frame.f_locals.values()):
                give_traceable_forwards(module, every_module=every_module)
                _open_inner_frames(module)
    except Exception as error:  # noqa: BLE001 - a watcher must never break a compile
        _cannot_inspect(error)


def _cannot_inspect(error: Exception) -> None:
    if error.__class__.__name__ in _said:
        return
    _said.add(error.__class__.__name__)
    log.warning(
        "bnfx: could not inspect the frame Dynamo compiles (%s: %s), so its momentum=None and nn.SyncBatchNorm "
        "modules, and DDP over nn.Sequential, may run plain batch norm under the bnfx backend; bnfx.convert(model, "
        "...) and bnfx.transform work without it",
        type(error).__name__, error, exc_info=log.isEnabledFor(logging.DEBUG),
    )


def _frame_compiled_by_bnfx():
    """``(frame, options)``: the frame that the Dynamo compile on this thread's stack compiles
    and the bnfx options it compiles with, when the backend is bnfx's; else ``(None, None)``."""
    frame, compiler_fn = torch_internals.dynamo_compiling(sys._getframe(1))
    if frame is None:
        return None, None
    backend, given = torch_internals.dynamo_backend_of(compiler_fn)
    if not getattr(backend, "_bnfx_backend", False):
        return None, None
    # bnfx.backend(...)'s own options, and those torch.compile(..., options=...) passes on, as
    # the backend merges them
    return frame, {**getattr(backend, "_bnfx_options", {}), **given}


def _sync_mode(options: dict) -> bool:
    try:
        return resolve_backend_options(dict(options)).mode == "sync"
    except (TypeError, ValueError):  # the backend raises for them when it is called
        return False


def _modules_in(values) -> list[nn.Module]:
    modules = []
    for value in values:
        value = getattr(value, "__self__", value)  # a bound forward
        if isinstance(value, nn.Module):
            modules.append(value)
    return modules


def _open_inner_frames(root: nn.Module) -> None:
    for ddp in root.modules():
        if not isinstance(ddp, DistributedDataParallel) or ddp in _opened:
            continue
        _opened.add(ddp)
        inner = ddp.module
        if type(inner).forward.__module__.startswith("torch.") and any(
            isinstance(m, _BatchNorm) for m in inner.modules()
        ):
            inner.register_forward_pre_hook(_compile_this_forward)
            log.info("bnfx: Dynamo compiles %s.forward under DDP from now on", type(inner).__name__)


def _compile_this_forward(module, args) -> None:
    """Does nothing: its presence makes Dynamo compile the module's forward frame."""
