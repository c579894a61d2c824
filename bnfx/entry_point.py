"""The "bnfx" backend as the ``torch_dynamo_backends`` entry point loads it.

``torch.compile(..., backend="bnfx")`` imports this module (Dynamo is imported by then,
whether or not ``bnfx`` was): loading it also starts the watcher of ``bnfx.ddp_frames``.
"""

from bnfx import ddp_frames
from bnfx.compile_backend import bnfx_backend

ddp_frames.watch()

__all__ = ["bnfx_backend"]
