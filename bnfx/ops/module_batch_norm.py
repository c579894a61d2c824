"""torch.ops.bnfx.module_batch_norm: a batch-norm module's training call as torch defines it,
one node in a Dynamo graph.

Dynamo cannot trace two of torch's batch-norm forwards: ``momentum=None`` reads
``float(num_batches_tracked)`` (a data-dependent value), and nn.SyncBatchNorm's collectives
(an autograd.Function over a process group; on CPU it raises). The forwards bnfx gives such
modules in the frames it compiles (``bnfx.traceable_forward``) call this op instead, and
bnfx's passes rewrite it like any batch-norm site: ghost or sync batch norm, with the group
it names.

Where no bnfx pass rewrites it (another backend compiling the same module later, a site left
alone), it computes what the module's own forward would, from the ops bnfx already has
(CompositeImplicitAutograd: every tracer sees those ops): statistics over the ranks of
``group_name`` when it names one, else over the batch (one ghost batch of the whole batch),
with torch's cumulative average when ``momentum`` is None. Returns ``(out,
new_running_mean, new_running_var, new_num_batches_tracked)``, empty where the state is None.

Its one layer is that composition (CompositeImplicitAutograd), not a ``custom_op`` as the
other ops are: it names a site and has no kernels of its own, so every tracer, autograd and
device see the ghost or sync op it calls, with their layers.
"""

from __future__ import annotations

import torch

# One ghost batch spans any batch.
_WHOLE_BATCH = 2**62

_library = torch.library.Library("bnfx", "FRAGMENT")
_library.define(
    "module_batch_norm(Tensor input, Tensor? weight, Tensor? bias, Tensor? running_mean, Tensor? running_var, "
    "Tensor? num_batches_tracked, float? momentum, float eps, str? group_name) -> (Tensor, Tensor, Tensor, Tensor)"
)


@torch.library.impl(_library, "module_batch_norm", "CompositeImplicitAutograd")
def _module_batch_norm(input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps, group_name):
    state = (input, weight, bias, running_mean, running_var, num_batches_tracked)
    if group_name is not None:
        outputs = torch.ops.bnfx.sync_batch_norm(*state, momentum, eps, group_name)
    elif input.shape[0] == 0:  # (a rank's empty share of a sync batch, while Dynamo traces)
        return _empty_batch(*state, eps)
    elif input.numel() == input.shape[1]:
        # One value per channel: a legal share of a sync group's batch while Dynamo traces (the
        # pass makes it sync batch norm); torch's error anywhere else
        if not torch.compiler.is_compiling():
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {input.size()}")
        return _empty_batch(*state, eps)
    else:
        outputs = torch.ops.bnfx.ghost_batch_norm(*state, _WHOLE_BATCH, momentum, eps)
    return tuple(outputs[:4])


def _empty_batch(input, weight, bias, running_mean, running_var, num_batches_tracked, eps):
    """torch's batch norm of an empty batch: an empty output, the statistics as they were,
    the batch counted (for a one-sample batch: the shapes of what it returns)."""
    out = torch.batch_norm(input, weight, bias, None, None, True, 0.0, eps, False)

    def unchanged(state):
        return input.new_empty(0) if state is None else state.clone()

    tracked = input.new_empty(0) if num_batches_tracked is None else num_batches_tracked + 1
    return out, unchanged(running_mean), unchanged(running_var), tracked
