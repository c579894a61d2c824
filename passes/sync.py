"""Rewrite batch-norm sites into synchronized batch norm over a process group (or freeze them)."""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import fx

from bnfx.functional import sync_batch_norm_module, sync_batch_norm_of, sync_own_forward
from bnfx.ops.collective_tags import site_tag
from bnfx.passes.freeze import freeze_site, has_running_stats
from bnfx.passes.report import Report
from bnfx.passes.rewrite import (
    FOLLOWS_MODULE, reads_saved_statistics, replace_functional_site, replace_module_site, replace_owned_site,
    report_converted, site_conversion, unsupported,
)
from bnfx.passes.sites import find_sites, match_site
from bnfx.passes.subgraphs import graph_modules, recompile
from bnfx.torch_internals import op_arguments, op_schema


@dataclass(frozen=True)
class SyncPlan:
    """What the sync rewrite of a graph needs before it runs: the process groups its sites
    reduce over (``sync`` values, the options' first, then the groups nn.SyncBatchNorm modules
    name) and what it does, which the ranks compare before any batch-norm collective."""

    syncs: tuple
    description: str


def plan_sync(gm: fx.GraphModule, options) -> SyncPlan:
    """The groups and description of ``rewrite_sync(gm, options, ...)``; makes no collective."""
    syncs, frozen, synced = [options.sync], 0, 0
    for site in find_sites(gm):
        freezes = _freezes(site, options)
        frozen += freezes
        synced += not freezes and unsupported(site) is None
        # a group only a site that reduces over it needs (frozen and converted ones do not)
        reduces = not freezes and site_conversion(site) is None
        if reduces and _own_group(site, options) not in syncs:
            syncs.append(_own_group(site, options))
    return SyncPlan(tuple(syncs), f"{synced} synchronized and {frozen} frozen batch-norm sites ({options.describe()})")


def rewrite_sync(gm: fx.GraphModule, options, report: Report, groups: dict) -> fx.GraphModule:
    """Make every training-mode batch-norm site of ``gm`` compute statistics over its sync group.

    ``groups``: for each ``sync`` of ``plan_sync(gm, options).syncs``, ``(SyncGroup, "")`` or
    ``(None, why batch norm stays local)``, as the door resolved them.
    """
    graphs = graph_modules(gm)
    nodes = [(site.node.graph.owning_module, site.node) for site in find_sites(gm)]
    # Sites are matched again one at a time: a rewrite changes the arguments of later sites.
    for index, site in enumerate(match_site(graph, node) for graph, node in nodes):
        graph = site.node.graph.owning_module
        if report_converted(site, report, options):
            continue
        if _freezes(site, options):
            freeze_site(graph, site, f"frozen_bn_{index}")
            report.rewritten(site, "frozen", "running statistics, no update, no weight/bias gradient")
            continue
        group, fallback = groups[_own_group(site, options)]
        reason = unsupported(site) or fallback
        if reason and site.owner_path is not None:  # plain batch norm, on the module's train/eval flag
            warning = replace_owned_site(graph, site, sync_batch_norm_of, (None,), f"plain_bn_{index}")
            report.left_alone(site, reason, warning)
            continue
        if reason:
            report.left_alone(site, reason)
            continue
        name, tag = f"sync_bn_{index}", site_tag(site.name)
        if site.form == "call_module":
            replace_module_site(graph, site, (sync_batch_norm_module, sync_own_forward), (group.name, tag), name)
        elif site.owner_path is not None:
            warning = replace_owned_site(graph, site, sync_batch_norm_of, (group.name, tag), name)
            report.rewritten(site, "sync", f"over {group.size} ranks; {FOLLOWS_MODULE}", warning)
            continue
        else:
            op = torch.ops.bnfx.sync_batch_norm.default
            replace_functional_site(graph, site, op, (site.momentum, site.eps, group.name, None, tag), name)
        report.rewritten(site, "sync", f"over {group.size} ranks")
    for graph in graphs:
        chain_sync_sites(graph.graph)
    recompile(graphs)
    return gm


_SYNC_OP = torch.ops.bnfx.sync_batch_norm.default
_SYNC_ARGUMENTS = op_arguments(_SYNC_OP)
_LINK = len(op_schema(_SYNC_OP).returns) - 1  # the op's last output: the chain's next link


def chain_sync_sites(graph: fx.Graph) -> None:
    """Each ``bnfx::sync_batch_norm`` call of ``graph`` takes the previous one's ``order``
    output (``bnfx.collective_order``): the collectives keep the graph's order (the program's)
    under any compiler and scheduler, the backward's through the links' gradients."""
    link = None
    for node in list(graph.nodes):
        if node.op != "call_function" or getattr(node.target, "default", node.target) is not _SYNC_OP:
            continue
        values = dict(zip((a.name for a in _SYNC_ARGUMENTS), node.args), **node.kwargs)
        if link is not None:
            values["order"] = link
        node.target = _SYNC_OP
        node.args = tuple(values.get(a.name, a.default_value if a.has_default_value() else None)
                          for a in _SYNC_ARGUMENTS)
        node.kwargs = {}
        with graph.inserting_after(node):
            link = graph.call_function(operator.getitem, (node, _LINK))


def _own_group(site, options):
    """``sync=True`` and an nn.SyncBatchNorm with a process_group (a module in ``transform``'s
    graph, or the group name Dynamo's graph gives ``bnfx.module_batch_norm``): that group;
    else the options'."""
    if options.sync is not True or site is None:
        return options.sync
    module = site.module
    if isinstance(module, torch.nn.SyncBatchNorm) and module.process_group is not None:
        return module.process_group
    return site.group_name or options.sync


def _freezes(site, options) -> bool:
    return options.freeze and has_running_stats(site) and not reads_saved_statistics(site)
