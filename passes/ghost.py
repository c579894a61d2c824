"""Rewrite batch-norm sites that use batch statistics into ghost batch norm."""

from __future__ import annotations

import operator

import torch
from torch import fx
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.lazy import LazyModuleMixin

from bnfx.functional import ghost_batch_norm_module
from bnfx.passes.report import Report
from bnfx.passes.sites import BatchNormSite, match_site


def rewrite_ghost(gm: fx.GraphModule, options, report: Report) -> fx.GraphModule:
    """Make every training-mode batch-norm site of ``gm`` compute ghost batch norm."""
    size = options.ghost_batch_size
    # Sites are matched one at a time: a rewrite changes the arguments of later sites.
    sites = (match_site(gm, node) for node in list(gm.graph.nodes))
    for index, site in enumerate(site for site in sites if site is not None):
        reason = _unsupported(site)
        if reason:
            report.left_alone(site, reason)
            continue
        if site.form == "call_module":
            _rewrite_module_site(gm, site, size, f"ghost_bn_{index}")
        else:
            _rewrite_functional_site(gm, site, size, f"ghost_bn_{index}")
        report.rewritten(site, "ghost", f"ghost_batch_size={size}")
    gm.graph.lint()
    gm.recompile()
    return gm


def _unsupported(site: BatchNormSite) -> str | None:
    """Why ``site`` stays as it is, or None when it can be rewritten."""
    if site.form == "call_module":
        forward = type(site.module).forward
        if forward is not _BatchNorm.forward:
            return f"{type(site.module).__name__} has its own forward"
        if isinstance(site.module, LazyModuleMixin) and site.module.has_uninitialized_params():
            return "lazy module not initialized yet"
        return None
    if site.training is False:
        return "eval mode: normalizes with running statistics"
    if site.training is not True:
        return "training flag is computed in the graph"
    if isinstance(site.momentum, fx.Node):
        return "momentum is computed in the graph"
    if site.running_mean is not None and site.momentum is None and site.num_batches_tracked is None:
        return "momentum=None without a num_batches_tracked buffer"
    return None


def _rewrite_module_site(gm: fx.GraphModule, site: BatchNormSite, size: int, name: str) -> None:
    # The module stays in place (state_dict keys unchanged); its train/eval flag is read at run time.
    graph, node = gm.graph, site.node
    with graph.inserting_before(node):
        module = graph.get_attr(node.target)
        new = graph.create_node(
            "call_function", ghost_batch_norm_module, (module, site.input, size), name=name
        )
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    graph.erase_node(node)


def _rewrite_functional_site(gm: fx.GraphModule, site: BatchNormSite, size: int, name: str) -> None:
    graph, node = gm.graph, site.node
    # The op counts the chunks into num_batches_tracked itself, replacing Dynamo's add_(1).
    tracked = site.num_batches_tracked if site.running_mean is not None else None
    with graph.inserting_before(node):
        ghost = graph.create_node(
            "call_function",
            torch.ops.bnfx.ghost_batch_norm.default,
            (site.input, site.weight, site.bias, site.running_mean, site.running_var, tracked,
             size, site.momentum, site.eps),
            name=name,
        )
        out = graph.call_function(operator.getitem, (ghost, 0))
        for index, state in ((1, site.running_mean), (2, site.running_var), (3, tracked)):
            if state is not None:
                new_state = graph.call_function(operator.getitem, (ghost, index))
                graph.call_function(torch.ops.aten.copy_.default, (state, new_state))
    out.meta = dict(node.meta)
    node.replace_all_uses_with(out)
    graph.erase_node(node)
    if tracked is not None and site.tracked_update is not None:
        graph.erase_node(site.tracked_update)
