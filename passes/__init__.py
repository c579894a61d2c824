"""bnfx graph passes: pure functions of a graph and options, which rewrite the graph in place
and report what they did. They warn about nothing and make no collective: the doors
(``bnfx.rewriting``) resolve sync mode's process groups first and say what stays plain."""

from __future__ import annotations

from torch import fx

from bnfx.passes.ghost import rewrite_ghost
from bnfx.passes.report import Report, SiteRecord
from bnfx.passes.sites import BatchNormSite, find_sites, rewritten_sites
from bnfx.passes.sync import SyncPlan, plan_sync, rewrite_sync

__all__ = ["BatchNormSite", "Report", "SiteRecord", "SyncPlan", "find_sites", "plan_sync", "run_passes"]


def run_passes(gm: fx.GraphModule, options, groups: dict | None = None) -> Report:
    """Rewrite ``gm`` in place; return what was done to each batch-norm site.

    Sync mode: ``groups`` maps each ``sync`` of ``plan_sync(gm, options).syncs`` to its
    ``(SyncGroup, "")`` or ``(None, why batch norm stays local)``.
    """
    report = Report()
    for site in rewritten_sites(gm):  # a rewrite before this one: reported, never rewritten twice
        report.made_earlier(site, site.action, "bnfx.convert or a rewrite before", options, site.ghost_batch_size)
    if options.mode == "ghost":
        rewrite_ghost(gm, options, report)
    else:
        rewrite_sync(gm, options, report, groups)
    return report
