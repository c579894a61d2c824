"""Forwards Dynamo can trace, for the batch-norm modules whose own forward it cannot.

- ``momentum=None``: torch's forward (and a NormAct subclass's) reads
  ``float(num_batches_tracked)``, a data-dependent value: Dynamo breaks the graph there.
- nn.SyncBatchNorm in an initialized process group: its forward raises on CPU and runs an
  autograd.Function with collectives on GPU, which Dynamo cannot trace either
  (pytorch/pytorch#161302).
- In sync mode, any batch norm: a rank's share of the group's batch may be one sample, which
  torch's forward refuses while Dynamo traces it (the group's batch is legal).

When Dynamo starts compiling a frame for bnfx (``frame_watch``), such modules in that frame
get an instance ``forward`` that runs their class's forward as before in eager mode and
under torch.export, and while Dynamo traces it for torch.compile, calls
``torch.ops.bnfx.module_batch_norm`` (naming the module's process group for
nn.SyncBatchNorm) wherever the forward would use batch statistics: one graph, no break, a
site bnfx's passes rewrite. Compiles for other backends never touch
these modules; a module once compiled for bnfx and compiled again for another backend gets
that op's own implementation, which computes what its forward would.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from bnfx.convert import conversion_of
from bnfx.functional import batch_stats_module, module_batch_norm
from bnfx.own_forward import run_own_forward
from bnfx.passes.rewrite import has_own_forward

log = logging.getLogger("bnfx")


def give_traceable_forwards(root: nn.Module, *, every_module: bool = False) -> list[str]:
    """Give every module of ``root`` that needs one a traceable forward (``every_module``:
    every batch-norm module); return their names."""
    names = []
    for name, module in root.named_modules():
        if not isinstance(module, _BatchNorm) or conversion_of(module) is not None:  # bnfx.convert's traces
            continue
        group_name = _sync_group_name(module)
        cumulative = module.momentum is None and module.track_running_stats
        if not (cumulative or group_name is not None or every_module):
            continue
        current = module.__dict__.get("forward")
        if isinstance(current, functools.partial) and current.args == (module, group_name):
            continue
        module.forward = functools.partial(_traceable_forward, module, group_name)
        names.append(name or type(module).__name__)
    if names:
        log.info("bnfx: traceable forwards for %s", ", ".join(names))
    return names


def _sync_group_name(module: _BatchNorm) -> str | None:
    """The process group an nn.SyncBatchNorm synchronizes over (None where it runs plain)."""
    if not isinstance(module, nn.SyncBatchNorm) or has_own_forward(module):
        return None
    if not (dist.is_available() and dist.is_initialized()):
        return None
    return (module.process_group or dist.group.WORLD).group_name


def _traceable_forward(module: _BatchNorm, group_name: str | None, *args, **kwargs):
    forward = type(module).forward
    if not torch.compiler.is_compiling() or torch.compiler.is_exporting():  # eager, torch.export: as before
        return forward(module, *args, **kwargs)
    if has_own_forward(module):
        return run_own_forward(
            module, module_batch_norm, {"group_name": None}, *args, forward=forward, **kwargs
        )
    input = args[0] if args else kwargs["input"]
    return batch_stats_module(module, input, module_batch_norm, group_name=group_name)
