"""What every door does with a graph: plan, resolve sync mode's process groups, rewrite, warn.

The passes are pure (``bnfx.passes``); the one side effect of a rewrite happens here, between
planning and applying: in sync mode, bnfx's communicator is created over the ranks of each
group the graph's sites reduce over, and the ranks compare what they rewrite (a collective,
``bnfx.process_groups``). ``explain_graph`` resolves the groups without creating anything.
"""

from __future__ import annotations

from torch import fx

from bnfx.passes import Report, plan_sync, run_passes
from bnfx.process_groups import sync_group


def rewrite_graph(gm: fx.GraphModule, options) -> Report:
    """Rewrite ``gm`` in place (sync mode: a collective over its groups); the sites that stay
    plain batch norm are said at WARNING."""
    report = run_passes(gm, options, _groups(gm, options, create=True))
    report.warn_plain_sites()
    return report


def explain_graph(gm: fx.GraphModule, options) -> Report:
    """Rewrite ``gm`` in place as ``rewrite_graph`` would, creating nothing, saying nothing:
    its report (``gm`` is the caller's copy)."""
    return run_passes(gm, options, _groups(gm, options, create=False))


def _groups(gm: fx.GraphModule, options, *, create: bool) -> dict | None:
    if options.mode != "sync":
        return None
    plan = plan_sync(gm, options)
    return {sync: sync_group(sync, options.group_size, create=create, plan=plan.description) for sync in plan.syncs}
