"""Activation checkpointing's recomputation: bnfx's batch norms write no state while it runs.

Under ``torch.utils.checkpoint`` a region runs twice per training step: in the forward, and
again in the backward to rebuild what it did not keep. Run eagerly, torch's batch norm updates
its running statistics both times. bnfx's batch norms update them once, as the model without
checkpointing does (and a compiled checkpointed model, whose backward recomputes the
normalization, not the update): the second run writes no state. bnfx knows the second run
two ways: a region ``bnfx.trace`` kept runs it under ``run_checkpointed``; any other (a
``bnfx.convert`` model checkpointed eagerly, reentrant or not) runs while autograd's engine
runs a backward, which torch tells through one private function (``bnfx.torch_internals``).
"""

from __future__ import annotations

import contextlib
import threading

import torch
import torch.utils.checkpoint

from bnfx.torch_internals import in_backward


class _Depth(threading.local):
    value = 0  # nested recomputations on this thread (a class default: read on every batch-norm call)


_depth = _Depth()


def recomputing() -> bool:
    """Whether this thread is recomputing checkpointed code (its batch norms write no state):
    a region kept by ``bnfx.trace``, or any forward run eagerly inside a backward."""
    if _depth.value > 0:
        return True
    return not torch.compiler.is_compiling() and bool(in_backward())


@contextlib.contextmanager
def _recomputation():
    _depth.value += 1
    try:
        yield
    finally:
        _depth.value -= 1


def run_checkpointed(region, *args, **options):
    """``torch.utils.checkpoint.checkpoint(region, *args, **options)``, whose later runs of
    ``region`` (the recomputation in the backward, reentrant or not) update no batch-norm state."""
    if torch.compiler.is_compiling():  # one traced forward; compiled backwards recompute no update
        return torch.utils.checkpoint.checkpoint(region, *args, **options)
    runs = 0

    def run(*inputs):
        nonlocal runs
        runs += 1
        if runs == 1:
            return region(*inputs)
        with _recomputation():
            return region(*inputs)

    return torch.utils.checkpoint.checkpoint(run, *args, **options)
