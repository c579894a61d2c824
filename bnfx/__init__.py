"""bnfx: ghost and synchronized batch norm as torch.fx / torch.compile graph passes.

    torch.compile(model, backend="bnfx", options={"ghost_batch_size": 32})   # or {"sync": True}
    gm = bnfx.transform(torch.fx.symbolic_trace(model), ghost_batch_size=32)
    ep = bnfx.transform(torch.export.export(model, (x,)), ghost_batch_size=32)
    bnfx.convert(model, ghost_batch_size=32)   # in place, for eager trainers; bnfx.revert(model)
    print(bnfx.explain_convert(model, sync=True))   # what convert would do, changing nothing
    bnfx.recompute_statistics(model, loader, num_batches=200)   # PreciseBN, sync-aware
    folded = bnfx.fold(torch.export.export(model.eval(), (x,)))   # BN folded into conv/linear

The ``bnfx`` command (demo, inspect, export) is ``bnfx.cli``.
"""

__version__ = "0.1.0"  # (read by the packaging, and in bnfx's compile cache keys)

import torch

import bnfx.ops  # noqa: F401  (registers torch.ops.bnfx.*)
from bnfx.compile_backend import backend
from bnfx.convert import convert, explain_convert, revert
from bnfx.fold import explain_fold, fold
from bnfx.options import Options, resolve_options
from bnfx.passes import Report, find_sites
from bnfx.population_statistics import recompute_statistics
from bnfx.torch_internals import check_torch_version
from bnfx.transform import explain, trace, transform

check_torch_version(torch.__version__)

__all__ = [
    "__version__", "Options", "Report", "backend", "convert", "explain", "explain_convert", "explain_fold",
    "find_sites", "fold", "recompute_statistics", "resolve_options", "revert", "trace", "transform",
]
