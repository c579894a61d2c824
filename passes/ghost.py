"""Rewrite batch-norm sites that use batch statistics into ghost batch norm."""

from __future__ import annotations

import torch
from torch import fx

from bnfx.functional import ghost_batch_norm_module, ghost_batch_norm_of, ghost_own_forward
from bnfx.passes.report import Report
from bnfx.passes.rewrite import (
    FOLLOWS_MODULE, replace_functional_site, replace_module_site, replace_owned_site, report_converted, unsupported,
)
from bnfx.passes.sites import match_site
from bnfx.passes.subgraphs import graph_modules, recompile


def rewrite_ghost(gm: fx.GraphModule, options, report: Report) -> fx.GraphModule:
    """Make every training-mode batch-norm site of ``gm`` compute ghost batch norm."""
    size = options.ghost_batch_size
    graphs = graph_modules(gm)
    # Sites are matched one at a time: a rewrite changes the arguments of later sites.
    sites = (match_site(graph, node) for graph in graphs for node in list(graph.graph.nodes))
    for index, site in enumerate(site for site in sites if site is not None):
        if report_converted(site, report, options):
            continue
        reason = unsupported(site)
        if reason:
            report.left_alone(site, reason)
            continue
        name = f"ghost_bn_{index}"
        graph = site.node.graph.owning_module
        if site.form == "call_module":
            replace_module_site(graph, site, (ghost_batch_norm_module, ghost_own_forward), (size,), name)
        elif site.owner_path is not None:
            warning = replace_owned_site(graph, site, ghost_batch_norm_of, (size,), name)
            report.rewritten(site, "ghost", f"ghost_batch_size={size}; {FOLLOWS_MODULE}", warning)
            continue
        else:
            op = torch.ops.bnfx.ghost_batch_norm.default
            replace_functional_site(graph, site, op, (size, site.momentum, site.eps), name)
        report.rewritten(site, "ghost", f"ghost_batch_size={size}")
    recompile(graphs)
    return gm
