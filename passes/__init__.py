"""bnfx graph passes. The pipeline for a set of options is the explicit list below."""

from __future__ import annotations

from torch import fx

from bnfx.passes.ghost import rewrite_ghost
from bnfx.passes.report import Report, SiteRecord
from bnfx.passes.sites import BatchNormSite, find_sites, rewritten_sites
from bnfx.passes.sync import rewrite_sync

__all__ = ["BatchNormSite", "Report", "SiteRecord", "find_sites", "pipeline", "run_passes"]


def pipeline(options) -> list:
    """The passes that ``options`` call for, in the order they run."""
    if options.mode == "ghost":
        return [rewrite_ghost]
    return [rewrite_sync]


def run_passes(gm: fx.GraphModule, options, *, dry_run: bool = False) -> Report:
    """Rewrite ``gm`` in place; return what was done to each batch-norm site.

    Sites that stay plain batch norm in training are reported at WARNING level with their
    reason. ``dry_run`` (``bnfx.explain``): the report only, no warning and no collective call.
    """
    report = Report()
    for site in rewritten_sites(gm):  # a rewrite before this one: reported, never rewritten twice
        report.rewritten(site, site.action, site.detail)
    for rewrite in pipeline(options):
        rewrite(gm, options, report, dry_run=dry_run)
    if not dry_run:
        report.warn_plain_sites()
    return report
