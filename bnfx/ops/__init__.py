"""The bnfx operator library: importing it registers every ``torch.ops.bnfx.*`` op, and the C++
CPU kernels where they are built (``device_kernels.cpu_kernels``)."""

from bnfx import compile_cache, torch_internals
from bnfx.ops import collective_tags as _collective_tags  # noqa: F401  (registers bnfx::collective_mismatch)
from bnfx.ops import device_kernels
from bnfx.ops import module_batch_norm as _module_batch_norm  # noqa: F401  (registers bnfx::module_batch_norm)
from bnfx.ops import ghost_batch_norm as _ghost_batch_norm
from bnfx.ops import sync_batch_norm as _sync_batch_norm  # (registers bnfx::sync_batch_norm)
from bnfx.ops.ghost_batch_norm import ghost_chunk_count, ghost_chunk_layout

# What inductor compiles in place of each op: primitives it fuses with the layers around, in
# every inductor compile (torch.compile's default backend too: converted models fuse), whose
# cache keys then carry bnfx's fingerprint.
DECOMPOSITIONS = {**_ghost_batch_norm.DECOMPOSITIONS, **_sync_batch_norm.DECOMPOSITIONS}
torch_internals.extend_inductor_decompositions(
    DECOMPOSITIONS, then=lambda: compile_cache.add_fingerprint(DECOMPOSITIONS))

device_kernels.cpu_kernels()  # after the ops are defined: the library registers kernels for them

__all__ = ["DECOMPOSITIONS", "ghost_chunk_count", "ghost_chunk_layout"]
