"""Batch-norm subclasses with a ``forward`` of their own (NormAct layers: batch norm, then an
activation, in one module): their forward runs as written, and the batch-norm call inside
it computes ghost (or sync) statistics.

Tracing through such a forward would bake in its train/eval branch; so the module stays one
call in the graph, and while its forward runs a TorchFunctionMode redirects its
``F.batch_norm`` (or ``torch.batch_norm``) calls that use batch statistics. With
``momentum=None`` the forward's ``1 / float(num_batches_tracked)`` is not used (the op keeps
the cumulative average itself), so the mode answers that ``float`` without reading the
counter: no host synchronization, and nothing data-dependent for torch.export or Dynamo.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm
from torch.overrides import TorchFunctionMode

from bnfx.call_arguments import functional_arguments

log = logging.getLogger("bnfx")
_warned: set[type] = set()
# How a forward reads its counter for ``momentum=None``, and what it gets back: any count
# will do, the batch-norm call it feeds is redirected with momentum=None.
_READ_COUNT = (Tensor.__float__, Tensor.item)
_UNUSED_COUNT = 1.0
# How a forward adds one to its counter: skipped, the bnfx op counts (and a recomputation
# that checkpointing stops early, inside the op, leaves no increment behind)
_COUNT = (Tensor.add_, Tensor.__iadd__)


def run_own_forward(module: _BatchNorm, batch_norm, options: dict, *args, every_call: bool = False, forward=None,
                    **kwargs):
    """``module(*args, **kwargs)`` with ``batch_norm(input, running_mean, running_var, weight,
    bias, momentum, eps, num_batches_tracked=..., **options)`` wherever its forward calls batch
    norm with batch statistics on its own buffers (or none); ``every_call``: eval-mode calls
    on its own buffers too (freeze). ``forward``: call ``forward(module, ...)`` instead, no hooks
    (from inside the module's call)."""
    # The bnfx op owns the counter (ghost adds one per chunk): start from the count before
    # the forward, whatever the forward itself added.
    tracked = module.num_batches_tracked
    start = None if tracked is None or not module.training else tracked.clone()
    redirect = _Redirect(module, batch_norm, options, start, every_call)
    with redirect:
        out = module(*args, **kwargs) if forward is None else forward(module, *args, **kwargs)
    if redirect.calls == 0 and (module.training or module.running_mean is None) and type(module) not in _warned:
        _warned.add(type(module))
        log.warning(
            "bnfx: %s.forward computed batch norm without F.batch_norm, which bnfx redirects: "
            "it stays plain batch norm",
            type(module).__name__,
        )
    return out


class _Redirect(TorchFunctionMode):
    def __init__(self, module: _BatchNorm, batch_norm, options: dict, start_count: Tensor | None, every_call: bool):
        super().__init__()
        self.module, self.batch_norm, self.options, self.start_count = module, batch_norm, options, start_count
        self.every_call = every_call
        self.calls = 0
        # the forward's 1 / count goes unused: the op keeps the cumulative average itself
        self.cumulative = start_count is not None and module.momentum is None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        on_counter = self.start_count is not None and args and args[0] is self.module.num_batches_tracked
        if on_counter and func in _COUNT:
            return args[0]
        if on_counter and self.cumulative and func in _READ_COUNT:
            return _UNUSED_COUNT
        if func not in (F.batch_norm, torch.batch_norm):
            return func(*args, **kwargs)
        call = functional_arguments(func, args, kwargs)
        module = self.module
        own_state = call["running_mean"] is module.running_mean and call["running_mean"] is not None
        redirected = own_state if self.every_call else call["training"] and (own_state or call["running_mean"] is None)
        if not redirected:
            return func(*args, **kwargs)
        self.calls += 1
        momentum = call["momentum"]
        counter = None
        if own_state and self.start_count is not None:
            counter = self.start_count
            if self.cumulative:
                momentum = None
        out = self.batch_norm(
            call["input"], call["running_mean"], call["running_var"], call["weight"], call["bias"],
            momentum, call["eps"], num_batches_tracked=counter, **self.options,
        )
        if counter is not None:
            module.num_batches_tracked.copy_(counter)  # an integer tensor: no gradient to record
        return out
