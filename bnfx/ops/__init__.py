"""The bnfx operator library: importing it registers every ``torch.ops.bnfx.*`` op."""

from bnfx.ops.ghost_batch_norm import DECOMPOSITIONS, ghost_chunk_count, ghost_chunk_layout

__all__ = ["DECOMPOSITIONS", "ghost_chunk_count", "ghost_chunk_layout"]
