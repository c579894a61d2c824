"""Rewrite batch-norm sites into synchronized batch norm over a process group (or freeze them)."""

from __future__ import annotations

import torch
from torch import fx

from bnfx.functional import frozen_batch_norm_module, sync_batch_norm_module
from bnfx.passes.report import Report
from bnfx.passes.rewrite import replace_functional_site, replace_module_site, unsupported
from bnfx.passes.sites import BatchNormSite, match_site
from bnfx.process_groups import sync_group


def rewrite_sync(gm: fx.GraphModule, options, report: Report, *, dry_run: bool = False) -> fx.GraphModule:
    """Make every training-mode batch-norm site of ``gm`` compute statistics over the sync group.

    ``dry_run`` (``bnfx.explain``) creates no communicator: the graph names none that runs.
    """
    group, fallback = sync_group(options.sync, options.group_size, create=not dry_run)
    sites = (match_site(gm, node) for node in list(gm.graph.nodes))
    for index, site in enumerate(site for site in sites if site is not None):
        if options.freeze and _has_running_stats(site):
            _freeze(gm, site, f"frozen_bn_{index}")
            report.rewritten(site, "frozen", "running statistics, no update, no weight/bias gradient")
            continue
        reason = unsupported(site) or fallback
        if reason:
            report.left_alone(site, reason)
            continue
        name = f"sync_bn_{index}"
        if site.form == "call_module":
            replace_module_site(gm, site, sync_batch_norm_module, (group.name,), name)
        else:
            op = torch.ops.bnfx.sync_batch_norm.default
            replace_functional_site(gm, site, op, (site.momentum, site.eps, group.name), name)
        report.rewritten(site, "sync", f"over {group.size} ranks")
    gm.graph.lint()
    gm.recompile()
    return gm


def _has_running_stats(site: BatchNormSite) -> bool:
    if site.form == "call_module":
        return site.module.running_mean is not None
    return site.running_mean is not None


def _freeze(gm: fx.GraphModule, site: BatchNormSite, name: str) -> None:
    if site.form == "call_module":
        replace_module_site(gm, site, frozen_batch_norm_module, (), name)
        return
    graph, node = gm.graph, site.node
    with graph.inserting_before(node):
        weight, bias = (
            None if param is None else graph.call_method("detach", (param,)) for param in (site.weight, site.bias)
        )
        new = graph.call_function(
            torch.nn.functional.batch_norm,
            (site.input, site.running_mean, site.running_var, weight, bias, False, 0.0, site.eps),
        )
    new.name = name
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    graph.erase_node(node)
    if site.tracked_update is not None:
        graph.erase_node(site.tracked_update)
