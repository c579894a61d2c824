"""``bnfx.transform`` and ``bnfx.explain``: the passes applied to traced graphs."""

from __future__ import annotations

import copy

import torch
from torch import fx, nn
from torch.fx.proxy import TraceError
from torch.nn.modules.batchnorm import _BatchNorm

from bnfx.export import transform_exported
from bnfx.messages import first_line
from bnfx.options import resolve_options
from bnfx.passes import Report
from bnfx.passes.subgraphs import attribute, nested_graph_module
from bnfx.rewriting import explain_graph, rewrite_graph
from bnfx.tracing import BatchNormTracer, loads_with_bnfx


def _graph_module(model) -> fx.GraphModule:
    if isinstance(model, fx.GraphModule):
        return model
    if isinstance(model, nn.Module):
        return trace(model)
    raise TypeError(f"model must be a torch.fx.GraphModule or an nn.Module, got {type(model).__name__}")


def trace(model: nn.Module) -> fx.GraphModule:
    """``torch.fx.symbolic_trace`` that keeps batch-norm subclasses as ``call_module`` sites."""
    if isinstance(model, _BatchNorm):
        raise TypeError(
            f"model must contain its batch-norm modules, got a bare {type(model).__name__}; "
            "wrap it, e.g. nn.Sequential(bn)"
        )
    try:
        tracer = BatchNormTracer()
        graph = tracer.trace(model)
    except Exception as error:
        raise TraceError(
            f"bnfx.transform cannot trace {type(model).__name__} with torch.fx.symbolic_trace: "
            f"{first_line(error)}. "
            "Models with data-dependent control flow or untraceable calls work through "
            'torch.compile(model, backend="bnfx", options={...}) or '
            "bnfx.transform(torch.export.export(model, (x,)), ...)"
        ) from error
    return tracer.graph_module(model, graph, type(model).__name__)


def _rewritten_copy(model, options: dict, rewrite=rewrite_graph):
    """``model`` rewritten (a copy) by ``rewrite`` (``rewrite_graph`` or ``explain_graph``), and the report."""
    opts = resolve_options(options)
    if isinstance(model, torch.export.ExportedProgram):
        return transform_exported(model, opts, rewrite)
    new = graph_copy(_graph_module(model))
    return new, rewrite(new, opts)


def graph_copy(gm: fx.GraphModule) -> fx.GraphModule:
    """New graphs over the same submodules: ``gm``'s graph and those nested in it are untouched,
    while parameters and buffers stay shared, so training the result updates the user's model."""
    graph = copy.deepcopy(gm.graph)
    loads_with_bnfx(graph)
    new = fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    _keep_batch_norm_owners(gm, new)
    copies = {}
    for node in new.graph.nodes:
        nested = nested_graph_module(new, node)
        if nested is not None and node.target not in copies:
            holder = attribute(new, node.target)
            copied = graph_copy(nested)
            # a checkpointed region holds its GraphModule: a new region around the copy
            copies[node.target] = copied if holder is nested else type(holder)(copied)
    for target, nested in copies.items():
        # a top-level name of its own: a dotted target's parent may be the user's module
        name = target if "." not in target else f"{target.replace('.', '_')}_graph"
        setattr(new, name, nested)
        for node in new.graph.nodes:
            if node.op in ("get_attr", "call_module") and node.target == target:
                node.target = name
    new.recompile()
    return new


def _keep_batch_norm_owners(gm: fx.GraphModule, new: fx.GraphModule) -> None:
    """Where ``gm`` reads a batch-norm module's attributes, ``new`` holds that module too, not
    the container GraphModule builds on the way to them: its flag, momentum and counter."""
    for node in new.graph.find_nodes(op="get_attr"):
        path = node.target.rpartition(".")[0]
        if not path:
            continue
        module = attribute(gm, path)
        if isinstance(module, _BatchNorm) and attribute(new, path) is not module:
            parent, _, name = path.rpartition(".")
            setattr(new.get_submodule(parent), name, module)


def transform(model, **options):
    """Return ``model`` with its batch-norm sites computing ghost (or sync) batch norm.

    ``model`` is a GraphModule (``torch.fx.symbolic_trace(model)``) or an nn.Module, which is
    traced first with ``bnfx.trace``; the result is a GraphModule sharing its parameters and
    buffers. Or ``model`` is a ``torch.export.ExportedProgram`` (training or decomposed IR);
    the result is a new ExportedProgram. The input is not modified.

    >>> gm = bnfx.transform(torch.fx.symbolic_trace(model), ghost_batch_size=32)
    >>> ep = bnfx.transform(torch.export.export(model, (x,)), ghost_batch_size=32)
    """
    return _rewritten_copy(model, options)[0]


def explain(model, **options) -> Report:
    """What ``transform(model, **options)`` does to each batch-norm site; ``print`` it for a table.

    It makes no collective call (sync mode's communicator is created by ``transform`` and the
    first compiled step), so one rank alone may call it.
    """
    return _rewritten_copy(model, options, explain_graph)[1]
