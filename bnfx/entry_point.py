"""The "bnfx" backend as the ``torch_dynamo_backends`` entry point loads it.

``torch.compile(..., backend="bnfx")`` imports this module (Dynamo is imported by then,
whether or not ``bnfx`` was): loading it also starts the watcher of ``bnfx.frame_watch``.
"""

from bnfx import frame_watch
from bnfx.compile_backend import bnfx_backend

frame_watch.watch()

__all__ = ["bnfx_backend"]
