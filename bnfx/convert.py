"""``bnfx.convert`` and ``bnfx.revert``: the door that needs no graph.

``convert`` gives every batch-norm module of a model an instance ``forward`` that computes
ghost, sync or frozen batch norm by calling bnfx's run-time functions (and so the bnfx ops):
the same module objects, types, parameters, buffers and state_dict keys, no wrapper modules.
The model is right eagerly, under DDP whatever its structure (DDP's own forward calls the
modules, converted), under torch.compile with any backend (Dynamo traces the instance forward
into bnfx ops, which no pass rewrites again) and under torch.export. ``revert`` removes those
forwards: the class's forward runs again.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import weakref
from dataclasses import dataclass
from types import SimpleNamespace

import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from bnfx import collective_order
from bnfx.functional import (
    frozen_batch_norm_module, frozen_own_forward, ghost_batch_norm_module, ghost_own_forward, sync_batch_norm_module,
    sync_own_forward,
)
from bnfx.ops.collective_tags import site_tag
from bnfx.options import resolve_options
from bnfx.passes.report import Report
from bnfx.passes.rewrite import has_own_forward
from bnfx.process_groups import sync_group

log = logging.getLogger("bnfx")


@dataclass(frozen=True)
class Conversion:
    """What a converted module computes: ``action`` "ghost", "sync" or "frozen" (None: plain,
    with ``reason``), with the ghost size or the sync group's name and the module's tag."""

    action: str | None
    ghost_batch_size: int | None = None
    group_name: str | None = None
    reason: str = ""
    site: int = 0


# converted model -> the hook handles of its collective chain (``collective_order``)
_chain_hooks: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def convert(model: nn.Module, **options) -> nn.Module:
    """Make every batch-norm module of ``model`` compute ghost (or sync, or frozen) batch norm,
    in place; returns ``model``. The options are ``bnfx.transform``'s. In sync mode this is a
    collective: every rank of the group converts (bnfx's communicator is created here).

    >>> model = bnfx.convert(model, ghost_batch_size=32)      # or sync=True
    >>> ddp = DDP(model)                                      # or bnfx.convert(DDP(model), sync=True)
    """
    modules, conversion = _plan(model, options, create=True)
    for name, module in modules:
        own = conversion
        if conversion.action == "sync":
            own = dataclasses.replace(conversion, site=site_tag(name or type(model).__name__))
        module.forward = functools.partial(converted_forward, module, own)
    _remove_chain_hooks(model)
    if conversion.action == "sync":
        # each forward of the model one chain of sync collectives, differentiable within it
        _chain_hooks[model] = (model.register_forward_pre_hook(collective_order.begin),
                               model.register_forward_hook(collective_order.end))
    _warn_cpu_sync_batch_norm(model, modules)
    if conversion.action is None and modules:
        names = ", ".join(name or type(model).__name__ for name, _ in modules)
        log.warning("bnfx: %d batch-norm modules stay plain batch norm (%s): %s", len(modules), conversion.reason, names)
    return model


def explain_convert(model: nn.Module, **options) -> Report:
    """What ``convert(model, **options)`` would make each batch-norm module compute, changing
    nothing; ``print`` it for a table. No collective: one rank alone may call it.

    >>> print(bnfx.explain_convert(model, sync=True))
    """
    modules, conversion = _plan(model, options, create=False)
    report = Report(done="converted")
    for name, module in modules:
        site = SimpleNamespace(name=name or type(model).__name__, form=type(module).__name__)
        if conversion.action is None:
            report.left_alone(site, conversion.reason)
            continue
        detail = f"ghost_batch_size={conversion.ghost_batch_size}" if conversion.action == "ghost" else ""
        if has_own_forward(module):
            detail += ("; " if detail else "") + "its own forward runs, its F.batch_norm calls redirected"
        report.rewritten(site, conversion.action, detail)
    return report


def _plan(model: nn.Module, options: dict, *, create: bool) -> tuple[list[tuple[str, _BatchNorm]], Conversion]:
    """The batch-norm modules of ``model`` and what they are to compute; ``create``: sync
    mode's communicator too (a collective)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    opts = resolve_options(options)
    modules = [(name, m) for name, m in model.named_modules() if isinstance(m, _BatchNorm)]
    if opts.mode == "ghost":
        return modules, Conversion("ghost", ghost_batch_size=opts.ghost_batch_size)
    if opts.freeze:
        return modules, Conversion("frozen")
    plan = f"{len(modules)} converted batch-norm modules ({opts.describe()}; {_layout_digest(modules)})"
    group, reason = sync_group(opts.sync, opts.group_size, plan=plan, create=create, compare=create)
    return modules, Conversion("sync", group_name=group.name) if group else Conversion(None, reason=reason)


def _layout_digest(modules) -> str:
    """A digest of the modules' names, types and sizes: ranks whose models differ differ here."""
    layout = [(name, type(m).__name__, getattr(m, "num_features", None)) for name, m in modules]
    return "layout " + hashlib.blake2b(repr(layout).encode(), digest_size=4).hexdigest()


def _warn_cpu_sync_batch_norm(model: nn.Module, modules) -> None:
    """DDP refuses nn.SyncBatchNorm modules on CPU (whatever computes them): say what to do."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return
    on_cpu = [name or type(model).__name__ for name, m in modules
              if isinstance(m, nn.SyncBatchNorm) and any(t.device.type == "cpu" for t in _tensors(m))]
    if on_cpu:
        log.warning(
            "bnfx: %d nn.SyncBatchNorm modules on CPU (%s), which DistributedDataParallel refuses; convert the "
            "model with torch's BatchNorm modules instead, without nn.SyncBatchNorm.convert_sync_batchnorm "
            "(Trainer(sync_batchnorm=True), timm's --sync-bn): bnfx.convert(model, sync=True) synchronizes them",
            len(on_cpu), ", ".join(on_cpu[:3]) + (", ..." if len(on_cpu) > 3 else ""),
        )


def _tensors(module: nn.Module):
    return list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))


def revert(model: nn.Module) -> nn.Module:
    """Undo ``convert``: every batch-norm module of ``model`` runs its class's forward again."""
    for module in model.modules():
        if conversion_of(module) is not None:
            del module.forward
        _remove_chain_hooks(module)
    return model


def _remove_chain_hooks(model: nn.Module) -> None:
    for handle in _chain_hooks.pop(model, ()):
        handle.remove()


def conversion_of(module: nn.Module) -> Conversion | None:
    """What ``convert`` made ``module`` compute, or None where it did not convert it."""
    forward = module.__dict__.get("forward")
    if isinstance(forward, functools.partial) and forward.func is converted_forward:
        return forward.args[1]
    return None


def converted_forward(module: _BatchNorm, conversion: Conversion, *args, **kwargs):
    """A converted module's forward: its class's forward with bnfx's statistics."""
    forward = type(module).forward
    if conversion.action is None:
        return forward(module, *args, **kwargs)
    if has_own_forward(module):
        if conversion.action == "ghost":
            return ghost_own_forward(module, conversion.ghost_batch_size, *args, forward=forward, **kwargs)
        if conversion.action == "sync":
            return sync_own_forward(module, conversion.group_name, conversion.site, *args, forward=forward, **kwargs)
        return frozen_own_forward(module, *args, forward=forward, **kwargs)
    input = args[0] if args else kwargs["input"]
    if conversion.action == "ghost":
        return ghost_batch_norm_module(module, input, conversion.ghost_batch_size)
    if conversion.action == "sync":
        return sync_batch_norm_module(module, input, conversion.group_name, conversion.site)
    return frozen_batch_norm_module(module, input)
