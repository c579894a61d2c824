"""The graphs a pass must visit: a graph, and every graph nested in it.

Dynamo puts an activation-checkpointed region into ``tag_activation_checkpoint`` and the
branches and bodies of ``cond``, ``while_loop``, ``wrap``, ``invoke_subgraph`` ... into
higher-order ops whose subgraphs are GraphModule attributes of the graph; ``bnfx.trace``
keeps ``torch.utils.checkpoint.checkpoint`` calls on a GraphModule of their own, and
``split_module`` calls its pieces as submodules. A walk over ``gm.graph.nodes`` alone sees
none of their batch norms.
"""

from __future__ import annotations

from torch import fx


def graph_modules(gm: fx.GraphModule) -> list[fx.GraphModule]:
    """``gm``, then every GraphModule its graph reads or calls, recursively, each once."""
    found: list[fx.GraphModule] = []
    pending = [gm]
    while pending:
        current = pending.pop(0)
        if any(current is seen for seen in found):
            continue
        found.append(current)
        pending.extend(nested_graph_modules(current))
    return found


def nested_graph_modules(gm: fx.GraphModule) -> list[fx.GraphModule]:
    """The GraphModules ``gm``'s graph reads (``get_attr``: higher-order ops' subgraphs) or
    calls (``call_module``), in graph order."""
    return [nested for node in gm.graph.nodes if (nested := nested_graph_module(gm, node)) is not None]


def nested_graph_module(gm: fx.GraphModule, node: fx.Node) -> fx.GraphModule | None:
    """The GraphModule that ``node`` reads or calls (or that the value it reads holds, as a
    ``bnfx.tracing.CheckpointedRegion`` does), or None."""
    if node.op not in ("get_attr", "call_module") or not isinstance(node.target, str):
        return None
    value = attribute(gm, node.target)
    value = getattr(value, "graph_module", value)
    return value if isinstance(value, fx.GraphModule) else None


def attribute(gm: fx.GraphModule, target: str):
    """What the dotted ``target`` names in ``gm`` (None where nothing does)."""
    value = gm
    for atom in target.split("."):
        value = getattr(value, atom, None)
    return value


def recompile(graphs: list[fx.GraphModule]) -> None:
    """Check and regenerate the code of every graph a pass changed, innermost first."""
    for gm in reversed(graphs):
        gm.graph.lint()
        gm.recompile()
