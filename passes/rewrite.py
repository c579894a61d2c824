"""Graph surgery shared by the passes: what they cannot rewrite, and how a site is replaced."""

from __future__ import annotations

import operator
from typing import Any, Callable

import torch
from torch import fx
from torch.nn.modules.batchnorm import _BatchNorm

from bnfx.ops import batch_norm_contract as contract
from bnfx.passes.report import EVAL_MODE
from bnfx.passes.sites import SAVED_OUTPUTS, BatchNormSite, output_name, tuple_outputs

# Why a site that uses batch statistics stays plain batch norm (``bnfx.explain``'s detail).
TRAINING_IN_GRAPH = "training flag is computed in the graph"
MOMENTUM_NONE_WITHOUT_COUNTER = "momentum=None without a num_batches_tracked buffer"
USES_SAVED_STATISTICS = "the graph uses batch norm's saved statistics"
REASONS = (TRAINING_IN_GRAPH, MOMENTUM_NONE_WITHOUT_COUNTER, USES_SAVED_STATISTICS)


def unsupported(site: BatchNormSite) -> str | None:
    """Why ``site`` cannot be rewritten into a batch-statistics op, or None when it can.

    Momentum and eps may be graph values (Dynamo passes float module attributes as tensors
    under ``dynamic=True`` and reads them with ``.item()``): the op takes them as they are.
    Lazy modules are rewritten too: the run-time helper initializes them on the first call.
    """
    if site.form == "call_module" or site.owner_path is not None:
        return None
    if site.training is False:
        return EVAL_MODE
    if site.training is not True:
        return TRAINING_IN_GRAPH
    if site.running_mean is not None and site.momentum is None and site.num_batches_tracked is None:
        return MOMENTUM_NONE_WITHOUT_COUNTER
    if reads_saved_statistics(site):
        return USES_SAVED_STATISTICS
    return None


def site_conversion(site: BatchNormSite):
    """What ``bnfx.convert`` made the site's module compute (a ``Conversion``), or None."""
    from bnfx.convert import conversion_of

    return None if site.module is None else conversion_of(site.module)


def report_converted(site: BatchNormSite, report, options) -> bool:
    """A module ``bnfx.convert`` converted computes bnfx's batch norm itself: reported as such,
    never rewritten again (True), whatever the options of this rewrite; where they ask for
    something else, the record carries a warning saying so."""
    conversion = site_conversion(site)
    if conversion is None:
        return False
    if conversion.action is None:
        report.left_alone(site, conversion.reason)
    else:
        report.made_earlier(site, conversion.action, "bnfx.convert", options, conversion.ghost_batch_size)
    return True


def reads_saved_statistics(site: BatchNormSite) -> bool:
    """The graph reads the statistics a tuple form saves for its backward."""
    return any(output_name(site, user) in SAVED_OUTPUTS for user in site.node.users)


def has_own_forward(module: _BatchNorm) -> bool:
    """A subclass whose ``forward`` is its own (NormAct layers), not ``_BatchNorm.forward``.

    nn.SyncBatchNorm's forward is batch norm with statistics over its process group (CUDA
    only): bnfx computes exactly that, on every device, as for ``_BatchNorm.forward``.
    """
    return type(module).forward not in (_BatchNorm.forward, torch.nn.SyncBatchNorm.forward)


def replace_module_site(gm: fx.GraphModule, site: BatchNormSite, fns: tuple[Callable, Callable], extra: tuple,
                        name: str) -> None:
    """``module(x)`` -> ``fn(module, x, *extra)``; the module stays in place (state_dict unchanged).

    ``fns``: the function for ``_BatchNorm.forward``, then the one for a forward of the
    subclass's own, called ``own(module, *extra, *args, **kwargs)`` with the call's arguments.
    """
    graph, node = gm.graph, site.node
    with graph.inserting_before(node):
        module = graph.get_attr(node.target)
        if has_own_forward(site.module):
            new = graph.create_node("call_function", fns[1], (module, *extra, *node.args), node.kwargs, name=name)
        else:
            new = graph.create_node("call_function", fns[0], (module, site.input, *extra), name=name)
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    graph.erase_node(node)


def replace_owned_site(gm: fx.GraphModule, site: BatchNormSite, fn: Callable, extra: tuple, name: str) -> str:
    """A call on a batch-norm module's own statistics -> ``fn(module, x, weight, bias,
    running_mean, running_var, num_batches_tracked, momentum, eps, *extra)``, which follows the
    train/eval flag of the module at ``site.owner_path`` at run time (and a batch-norm module's
    momentum and counter); the traced counter update goes (``fn`` counts). Returns the
    warning its report record carries ("" for none)."""
    graph, node = gm.graph, site.node
    with graph.inserting_before(node):
        module = graph.get_attr(site.owner_path)
        args = (site.input, site.weight, site.bias, site.running_mean, site.running_var, site.num_batches_tracked,
                site.momentum, site.eps)
        new = graph.call_function(fn, (module, *args, *extra), name=name)
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    graph.erase_node(node)
    if site.tracked_update is not None:
        graph.erase_node(site.tracked_update)
    return "" if isinstance(gm.get_submodule(site.owner_path), _BatchNorm) else TRACED_THROUGH


# The report's detail for such a site.
FOLLOWS_MODULE = "train/eval as its module at run time"
# symbolic_trace left a container in the module's place: what its forward read of the module
# (momentum, num_batches_tracked) was read while tracing, and stays as read then.
TRACED_THROUGH = (
    "momentum and num_batches_tracked as torch.fx.symbolic_trace read them in its forward (momentum=None "
    "does not average, the counter does not move): trace the model with bnfx.trace(model) instead"
)


def replace_functional_site(gm: fx.GraphModule, site: BatchNormSite, op, trailing: tuple[Any, ...], name: str) -> None:
    """A functional site -> ``op(x, weight, bias, running_mean, running_var, tracked, *trailing)``.

    ``op`` returns ``(out, new_running_mean, new_running_var, new_num_batches_tracked, ...)``;
    the new state is written back with ``copy_``, and the op's count replaces Dynamo's
    ``num_batches_tracked.add_(1)``.
    """
    graph, node = gm.graph, site.node
    tracked = site.num_batches_tracked if site.running_mean is not None else None
    with graph.inserting_before(node):
        new = graph.create_node(
            "call_function",
            op,
            (site.input, site.weight, site.bias, site.running_mean, site.running_var, tracked, *trailing),
            name=name,
        )
        # where it came from (a saved program names its sites by it), not what it computes
        new.meta.update({key: node.meta[key] for key in ("nn_module_stack", "stack_trace") if key in node.meta})
        out = graph.call_function(operator.getitem, (new, contract.output_index("out")))
        outputs = tuple_outputs(site)
        returns_state = "new_running_mean" in (outputs or ())
        for name, state in zip(contract.NEW_STATE, (site.running_mean, site.running_var, tracked)):
            if state is not None and not returns_state:  # else the graph returns the new state
                new_state = graph.call_function(operator.getitem, (new, contract.output_index(name)))
                graph.call_function(torch.ops.aten.copy_.default, (state, new_state))
    if outputs:
        def op_output(name: str, user: fx.Node) -> fx.Node:
            if name == "out":
                out.meta = dict(user.meta)
                return out
            with graph.inserting_after(new):
                taken = graph.call_function(operator.getitem, (new, contract.output_index(name)))
            taken.meta = dict(user.meta)
            return taken

        reroute_outputs(graph, site, op_output)
    else:
        out.meta = dict(node.meta)
        node.replace_all_uses_with(out)
        graph.erase_node(node)
    update = site.tracked_update
    if tracked is None or update is None:
        return
    if update.target is torch.ops.aten.add.Tensor:  # decomposed export: the new counter is a value
        with graph.inserting_after(new):
            counter = contract.output_index("new_num_batches_tracked")
            new_tracked = graph.call_function(operator.getitem, (new, counter))
        new_tracked.meta = dict(update.meta)
        update.replace_all_uses_with(new_tracked)
    graph.erase_node(update)


def reroute_outputs(graph: fx.Graph, site: BatchNormSite, replacement: Callable[[str, fx.Node], fx.Node]) -> None:
    """A form that returns a tuple: each ``getitem`` user takes ``replacement(name, user)``, for
    the output it reads by name, in its place; then the site goes."""
    for user in list(site.node.users):
        new = replacement(output_name(site, user), user)
        user.replace_all_uses_with(new)
        graph.erase_node(user)
    graph.erase_node(site.node)
