"""The tracer of bnfx's GraphModules: ``bnfx.trace`` traces models with it, and
``torch.load`` re-traces a transformed GraphModule's code with it.

- Every batch-norm module (user subclasses too) stays one ``call_module`` site.
- ``torch.utils.checkpoint.checkpoint`` calls stay checkpoint calls: the checkpointed
  function is traced into a GraphModule of its own (a ``CheckpointedRegion``), which the
  graph hands to ``checkpoint`` (through ``bnfx.recomputation.run_checkpointed``, so that its
  batch norms update their state once a step), so the traced model still recomputes it in
  the backward, and the passes rewrite its sites like any other (``bnfx.passes.subgraphs``).
- bnfx's run-time functions (the calls a rewrite puts where a batch-norm module was) stay
  calls: fx rebuilds a pickled GraphModule by tracing its generated code again, with the
  tracer class its graph names, and symbolic_trace's own would trace into them and fail.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math

import torch
import torch.utils.checkpoint
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.fx.node import map_aggregate

from bnfx.functional import RUNTIME_FUNCTIONS
from bnfx.recomputation import run_checkpointed
from bnfx.torch_internals import set_graph_tracer

log = logging.getLogger("bnfx")
_CHECKPOINT = torch.utils.checkpoint.checkpoint
# checkpoint's own keyword arguments, as opposed to those it passes to the function
_CHECKPOINT_OPTIONS = tuple(
    name for name, p in inspect.signature(_CHECKPOINT).parameters.items() if p.kind is p.KEYWORD_ONLY
)


class CheckpointedRegion:
    """A checkpointed part of a traced model: its GraphModule, which the graph hands to
    ``torch.utils.checkpoint.checkpoint``. Not an nn.Module: the model's ``state_dict`` and
    ``parameters()`` stay as they were (the region's modules are the model's own)."""

    def __init__(self, graph_module: fx.GraphModule):
        self.graph_module = graph_module

    def __call__(self, *args):
        return self.graph_module(*args)

    def __repr__(self) -> str:
        return f"CheckpointedRegion({type(self.graph_module).__name__})"


class BatchNormTracer(fx.Tracer):
    """symbolic_trace, with every batch-norm module kept as one ``call_module`` site,
    ``torch.utils.checkpoint.checkpoint`` calls kept, and bnfx's run-time functions kept as calls."""

    def __init__(self, autowrap_modules=(math,), autowrap_functions=()):
        super().__init__(autowrap_modules, tuple(autowrap_functions) + RUNTIME_FUNCTIONS)
        self.regions: dict[str, CheckpointedRegion] = {}

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, _BatchNorm) or super().is_leaf_module(m, qualname)

    def trace(self, root, concrete_args=None) -> fx.Graph:
        self.regions, self._region_attrs = {}, []
        with _checkpoint_calls_kept(self, root):
            graph = super().trace(root, concrete_args)
        for node in self._region_attrs:  # read inside a region only: the region reads them itself
            if not node.users:
                graph.erase_node(node)
        return graph

    def create_arg(self, a):
        if isinstance(a, CheckpointedRegion):  # re-tracing a saved GraphModule: the attribute holding it
            name = next(name for name, value in vars(self.root).items() if value is a)
            return self.create_node("get_attr", name, (), {})
        return super().create_arg(a)

    def graph_module(self, root: nn.Module, graph: fx.Graph, class_name: str) -> fx.GraphModule:
        """``fx.GraphModule(root, graph)``, holding the regions this trace made, and every module
        and tensor they use (``parameters()``, ``.to()``, ``train()`` reach them)."""
        used = set()
        for region in self.regions.values():
            used |= _targets(region.graph_module)
        present = {node.target for node in graph.nodes if node.op in ("get_attr", "call_module")}
        with graph.inserting_before(next(iter(graph.nodes))):
            temporary = [graph.get_attr(target) for target in sorted(used - present - set(self.regions))]
        gm = fx.GraphModule(_WithRegions(root, self.regions), graph, class_name=class_name)
        for node in temporary:
            graph.erase_node(node)
        gm.recompile()
        return gm

    def checkpoint(self, function=None, *args, **kwargs):
        """What ``torch.utils.checkpoint.checkpoint`` does while this tracer traces."""
        options = {name: kwargs.pop(name) for name in list(kwargs) if name in _CHECKPOINT_OPTIONS}
        traced = bool(_proxies((args, kwargs)))
        if function is None or not traced:
            return _CHECKPOINT(function, *args, **options, **kwargs)
        literal = all(isinstance(v, (bool, int, str, type(None))) for v in options.values())
        if not literal or kwargs:
            log.warning(
                "bnfx: a torch.utils.checkpoint.checkpoint call with %s is traced through, not kept: "
                "the traced model does not recompute %s",
                "keyword arguments for its function" if kwargs else "a context_fn", _describe(function),
            )
            return function(*args, **kwargs)
        return self._outline(function, args, options)

    def _outline(self, function, args: tuple, options: dict):
        """Trace ``function(*args)`` here, then move what it added into a region of its own."""
        graph = self.graph
        start = len(graph.nodes)
        out = function(*args)
        region = list(graph.nodes)[start:]
        inside = set(region)
        body = fx.Graph(tracer_cls=type(self))
        env: dict[fx.Node, fx.Node] = {}
        inputs: list[fx.Node] = []
        outputs = _proxies(out)
        for node in [*region, *(p.node for p in outputs)]:
            for used in node.all_input_nodes if node in inside else [node]:
                if used not in inside and used.op != "get_attr" and used not in inputs:
                    inputs.append(used)
        for node in inputs:
            env[node] = body.placeholder(node.name)

        def value(node: fx.Node) -> fx.Node:
            if node not in env:  # a parameter or buffer read before the region: read it here too
                env[node] = body.get_attr(node.target)
            return env[node]

        for node in region:
            env[node] = body.node_copy(node, value)
        results = [value(p.node) for p in outputs]
        body.output(results[0] if isinstance(out, fx.Proxy) else tuple(results))
        for node in reversed(region):
            if node.op == "get_attr":
                self._region_attrs.append(node)  # it may be read again after the region
            else:
                graph.erase_node(node)
        name = self._region_name()
        self.regions[name] = CheckpointedRegion(
            fx.GraphModule(_WithRegions(self.root, self.regions), body, class_name="CheckpointedRegion")
        )
        attribute = self.create_proxy("get_attr", name, (), {})
        call = self.create_proxy(
            "call_function", run_checkpointed, (attribute, *(fx.Proxy(n, self) for n in inputs)), options
        )
        if isinstance(out, fx.Proxy):
            return call
        results = iter([call[i] for i in range(len(outputs))])
        return map_aggregate(out, lambda value: next(results) if isinstance(value, fx.Proxy) else value)

    def _region_name(self) -> str:
        index = len(self.regions)
        while f"checkpoint_region_{index}" in self.regions or hasattr(self.root, f"checkpoint_region_{index}"):
            index += 1
        return f"checkpoint_region_{index}"


class _WithRegions(nn.Module):
    """``root`` as GraphModule reads it, with the regions of a trace beside its attributes."""

    def __init__(self, root: nn.Module, regions: dict):
        super().__init__()
        vars(self).update(_root=root, _regions=regions, training=root.training)
        self._non_persistent_buffers_set = root._non_persistent_buffers_set

    def __getattr__(self, name: str):
        regions = vars(self)["_regions"]
        return regions[name] if name in regions else getattr(vars(self)["_root"], name)


def _proxies(value) -> list[fx.Proxy]:
    """The proxies in ``value`` (nested tuples, lists and dicts), in order."""
    found = []
    map_aggregate(value, lambda v: found.append(v) if isinstance(v, fx.Proxy) else None)
    return found


def _targets(gm: fx.GraphModule) -> set[str]:
    """The attributes ``gm`` and the regions it calls read or call."""
    targets = set()
    for node in gm.graph.nodes:
        if node.op in ("get_attr", "call_module"):
            value = getattr(gm, node.target, None) if "." not in node.target else None
            if isinstance(value, CheckpointedRegion):
                targets |= _targets(value.graph_module)
            else:
                targets.add(node.target)
    return targets


def _describe(function) -> str:
    return type(function).__name__ if isinstance(function, nn.Module) else getattr(function, "__name__", "it")


@contextlib.contextmanager
def _checkpoint_calls_kept(tracer: BatchNormTracer, root):
    """``torch.utils.checkpoint.checkpoint`` is ``tracer.checkpoint`` while the block runs: the
    module's attribute, and the names the traced forwards' modules import it as."""
    namespaces = [vars(torch.utils.checkpoint)]
    modules = root.modules() if isinstance(root, nn.Module) else ()
    functions = [type(m).forward for m in modules] + ([root] if not isinstance(root, nn.Module) else [])
    for function in functions:
        namespace = getattr(inspect.unwrap(function), "__globals__", None)
        if namespace is not None and all(namespace is not n for n in namespaces):
            namespaces.append(namespace)
    patched = [(namespace, name) for namespace in namespaces for name, value in list(namespace.items())
               if value is _CHECKPOINT]
    for namespace, name in patched:
        namespace[name] = tracer.checkpoint
    try:
        yield
    finally:
        for namespace, name in patched:
            namespace[name] = _CHECKPOINT


def loads_with_bnfx(graph: fx.Graph) -> None:
    """``torch.load`` of a GraphModule over ``graph`` re-traces it with ``BatchNormTracer``.

    fx has no public setter for the tracer class of an existing graph (``bnfx.torch_internals``
    checks the private one).
    """
    set_graph_tracer(graph, BatchNormTracer)
