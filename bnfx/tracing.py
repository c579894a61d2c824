"""The tracer of bnfx's GraphModules: ``bnfx.trace`` traces models with it, and
``torch.load`` re-traces a transformed GraphModule's code with it.

fx rebuilds a pickled GraphModule by tracing its generated code again, with the tracer class
its graph names. symbolic_trace's own would trace into bnfx's run-time functions (the calls a
rewrite puts where a batch-norm module was) and fail on their control flow; this one keeps
them as calls, and keeps every batch-norm module (user subclasses too) as one call.
"""

from __future__ import annotations

import logging
import math

from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from bnfx.functional import RUNTIME_FUNCTIONS

log = logging.getLogger("bnfx")


class BatchNormTracer(fx.Tracer):
    """symbolic_trace, with every batch-norm module kept as one ``call_module`` site and bnfx's
    run-time functions kept as calls."""

    def __init__(self, autowrap_modules=(math,), autowrap_functions=()):
        super().__init__(autowrap_modules, tuple(autowrap_functions) + RUNTIME_FUNCTIONS)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, _BatchNorm) or super().is_leaf_module(m, qualname)


def loads_with_bnfx(graph: fx.Graph) -> None:
    """``torch.load`` of a GraphModule over ``graph`` re-traces it with ``BatchNormTracer``.

    fx has no public setter for the tracer class of an existing graph; where a torch release
    drops the attribute, saving keeps working and loading fails: said once, loudly.
    """
    if hasattr(graph, "_tracer_cls"):
        graph._tracer_cls = BatchNormTracer
    elif not getattr(loads_with_bnfx, "warned", False):
        loads_with_bnfx.warned = True
        log.warning(
            "bnfx: this torch's fx.Graph has no _tracer_cls, so a transformed GraphModule saved with torch.save "
            "cannot be loaded (fx re-traces bnfx's run-time functions); save its state_dict instead"
        )
