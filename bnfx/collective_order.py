"""The chain that orders the sync collectives of the code that calls bnfx's run-time functions
(converted models, transformed GraphModules): each ``bnfx::sync_batch_norm`` call takes the
previous call's ``order`` output as its ``order`` input.

A compiler may reorder two calls it sees as independent, and each rank compiles for its own
batch size: two sync batch norms on parallel branches (a downsample path beside the main
path) could then all-reduce in a different order on each rank, pairing the sums of
different layers. Chained, they cannot be reordered by anyone: each call's input depends on
the previous call's all-reduce. Dynamo traces the chain as it traces the calls, in program
order, so the graph every backend receives holds the dependency; the graphs bnfx rewrites
itself get the same chain as graph edges (``bnfx.passes.sync.chain_sync_sites``).

Within one forward of a converted model (``begin``/``end``, the model's forward pre- and
post-hook) the links stay differentiable: the backward's collectives then chain too, in the
reverse order, through their gradients. Between forwards, and for calls outside a converted
model's forward, a link is kept detached: a forward must never reach back into the autograd
graph of the previous one.
"""

from __future__ import annotations

from torch import Tensor


class _Chain:
    """The last link, and whether a converted model's forward is running."""

    def __init__(self) -> None:
        self.link: Tensor | None = None
        self.in_forward = False


_chain = _Chain()


def begin(*_hook_args) -> None:
    """A converted model's forward starts: a new chain, differentiable until ``end``."""
    _chain.link = None
    _chain.in_forward = True


def end(*_hook_args) -> None:
    _chain.link = None
    _chain.in_forward = False


def take() -> Tensor | None:
    """The ``order`` input of the next sync call (None: the first of its chain)."""
    return _chain.link


def put(link: Tensor) -> None:
    """A sync call's ``order`` output, which the next one takes."""
    _chain.link = link if _chain.in_forward else link.detach()
