"""Find the batch-norm call sites of an FX graph, whatever IR level it comes from."""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx
from torch.nn.modules.batchnorm import _BatchNorm

import bnfx.ops  # noqa: F401  (registers torch.ops.bnfx.module_batch_norm)
from bnfx.call_arguments import functional_arguments, schema_arguments
from bnfx.ops import batch_norm_contract as contract
from bnfx.passes.subgraphs import attribute, graph_modules


@dataclass(frozen=True)
class OpForm:
    """How one op spells batch norm: its arguments are read by name from its schema."""

    op: Any
    outputs: tuple[str, ...] | None = None  # the tuple it returns, by name; None: the output alone
    training: bool | None = None  # None: the op's ``training`` argument says
    # the schema's names for momentum and eps, where they differ
    momentum_argument: str = "momentum"
    eps_argument: str = "eps"

    @property
    def name(self) -> str:
        """The site's form: ``aten.batch_norm``, ``aten._native_batch_norm_legit.no_stats``,
        ``bnfx.module_batch_norm``."""
        return str(self.op).removesuffix(".default")


A = torch.ops.aten
B = torch.ops.bnfx
_SAVED = ("save_mean", "save_invstd")
_NEW_STATE = ("new_running_mean", "new_running_var")
# Every form torch 2.14 emits: training IR and pre-dispatch graphs (aten.batch_norm),
# decomposed export and AOTAutograd graphs (the functional forms, which return the new running
# statistics and write nothing), make_fx graphs without functionalization (the in-place forms).
_FORMS_BY_OP = {
    form.op: form
    for form in (
        OpForm(A.batch_norm.default),
        OpForm(A._native_batch_norm_legit_functional.default, ("out", *_SAVED, *_NEW_STATE)),
        OpForm(A._native_batch_norm_legit.default, ("out", *_SAVED)),
        OpForm(A._native_batch_norm_legit.no_stats, ("out", *_SAVED)),
        OpForm(A._native_batch_norm_legit_no_training.default, ("out", *_SAVED), training=False),
        OpForm(A.native_batch_norm.default, ("out", *_SAVED)),
        OpForm(A._batch_norm_with_update.default, ("out", *_SAVED, "reserve"), training=True),
        OpForm(A._batch_norm_with_update_functional.default, ("out", *_SAVED, "reserve", *_NEW_STATE), training=True),
        OpForm(A._batch_norm_no_update.default, ("out", *_SAVED, "reserve"), training=False),
        OpForm(
            A.cudnn_batch_norm.default, ("out", *_SAVED, "reserve"),
            momentum_argument="exponential_average_factor", eps_argument="epsilon",
        ),
        OpForm(B.module_batch_norm.default, contract.output_names("module_batch_norm"), training=True),
    )
}
OP_FORMS = {form.name: form for form in _FORMS_BY_OP.values()}
# The outputs that only batch norm's own backward reads.
SAVED_OUTPUTS = (*_SAVED, "reserve")


@dataclass
class BatchNormSite:
    """One batch-norm call, its arguments normalized across IR forms."""

    node: fx.Node
    form: str  # "call_module", "F.batch_norm", "torch.batch_norm", "aten.batch_norm", "aten._native_..."
    name: str  # the module path where known, else the node name
    input: fx.Node
    momentum: Any  # float, None, or an fx.Node computed in the graph
    eps: Any
    training: Any = None  # bool literal, an fx.Node, or None: the module's flag at run time
    module: _BatchNorm | None = None  # call_module sites: the module holds the state below
    weight: Any = None  # fx.Node or None
    bias: Any = None
    running_mean: Any = None
    running_var: Any = None
    num_batches_tracked: fx.Node | None = None
    # `num_batches_tracked.add_(1)` before the call (Dynamo, export), or `add(num_batches_tracked, 1)`
    # whose result is the new counter (decomposed export)
    tracked_update: fx.Node | None = None
    group_name: str | None = None  # bnfx.module_batch_norm: the process group its module names
    # A call on a batch-norm module's own running statistics, read as attributes: its forward
    # traced through (``symbolic_trace`` of a NormAct subclass), its train/eval flag baked into
    # ``training``. The flag of the module at ``owner_path`` at run time decides, as its forward
    # would: the batch-norm module itself, or the container symbolic_trace left in its place.
    owner_path: str | None = None


def find_sites(gm: fx.GraphModule, *, nested: bool = True) -> list[BatchNormSite]:
    """Every batch-norm call of ``gm``, in graph order, then those of the graphs nested in it
    (higher-order ops' subgraphs, GraphModule submodules); ``nested=False``: ``gm``'s own."""
    graphs = graph_modules(gm) if nested else [gm]
    return [site for graph in graphs for node in graph.graph.nodes if (site := match_site(graph, node)) is not None]


def match_site(gm: fx.GraphModule, node: fx.Node) -> BatchNormSite | None:
    """The batch-norm site that ``node`` is, or None."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if isinstance(module, _BatchNorm):
            return _module_site(node, module)
        return None
    if node.op != "call_function":
        return None
    if node.target in (F.batch_norm, torch.batch_norm):
        a = functional_arguments(node.target, node.args, node.kwargs)
        form = "F.batch_norm" if node.target is F.batch_norm else "torch.batch_norm"
        return _functional_site(
            gm, node, form, a["input"], a["weight"], a["bias"], a["running_mean"], a["running_var"], a["training"],
            a["momentum"], a["eps"],
        )
    form = _FORMS_BY_OP.get(node.target)
    if form is None:
        return None
    a = schema_arguments(node.target, node.args, node.kwargs)
    training = a["training"] if form.training is None else form.training
    site = _functional_site(
        gm, node, form.name, a["input"], a.get("weight"), a.get("bias"), a.get("running_mean"), a.get("running_var"),
        training, a[form.momentum_argument], a[form.eps_argument], a.get("num_batches_tracked"),
    )
    site.group_name = a.get("group_name")
    return site


def tuple_outputs(site: BatchNormSite) -> tuple[str, ...] | None:
    """The names of the outputs ``site`` returns as a tuple; None where it returns the output alone."""
    form = OP_FORMS.get(site.form)
    return form.outputs if form else None


def output_name(site: BatchNormSite, user: fx.Node) -> str | None:
    """Which named output of ``site`` the ``getitem`` node ``user`` takes (None otherwise)."""
    names = tuple_outputs(site)
    if names is None or user.target is not operator.getitem:
        return None
    return names[user.args[1]]


def _module_site(node: fx.Node, module: _BatchNorm) -> BatchNormSite:
    x = node.args[0] if node.args else node.kwargs["input"]
    return BatchNormSite(node, "call_module", node.target, x, module.momentum, module.eps, module=module)


def _functional_site(gm, node, form, x, weight, bias, mean, var, training, momentum, eps,
                     tracked=None) -> BatchNormSite:
    """``tracked``: the counter where the call names it, else the buffer named like ``mean``."""
    tracked = tracked if tracked is not None else _num_batches_tracked(gm, mean)
    owner_path = _owner_path(gm, mean, var) if form in ("F.batch_norm", "torch.batch_norm") else None
    return BatchNormSite(
        node, form, owner_path or module_path(node), x, momentum, eps, training=training,
        weight=weight, bias=bias, running_mean=mean, running_var=var,
        num_batches_tracked=tracked, tracked_update=_tracked_update(tracked, node), owner_path=owner_path,
    )


def _owner_path(gm: fx.GraphModule, mean: Any, var: Any) -> str | None:
    """The path of the batch-norm module whose ``running_mean`` and ``running_var`` attributes
    the call reads, or None. symbolic_trace keeps a plain container there, holding the tensors
    the graph reads; the module's class is in the node's ``nn_module_stack``."""
    if not all(isinstance(n, fx.Node) and n.op == "get_attr" for n in (mean, var)):
        return None
    path, _, name = mean.target.rpartition(".")
    if not path or name != "running_mean" or var.target != f"{path}.running_var":
        return None
    module = attribute(gm, path)
    if module is None:
        return None
    if isinstance(module, _BatchNorm):
        return path
    stack = mean.meta.get("nn_module_stack") or {}
    traced_class = next((cls for key, (_, cls) in stack.items() if key == path or key.endswith(f".{path}")), None)
    is_batch_norm = isinstance(traced_class, type) and issubclass(traced_class, _BatchNorm)
    return path if is_batch_norm else None


def _num_batches_tracked(gm: fx.GraphModule, running_mean: Any) -> fx.Node | None:
    """The counter buffer that belongs with ``running_mean``, found by the name both share."""
    if not isinstance(running_mean, fx.Node):
        return None
    by_target = running_mean.op == "get_attr"
    key = running_mean.target if by_target else running_mean.name
    if "running_mean" not in key:
        return None
    wanted = key.replace("running_mean", "num_batches_tracked")
    if by_target:
        return next((n for n in gm.graph.nodes if n.op == "get_attr" and n.target == wanted), None)
    return next((n for n in gm.graph.nodes if n.name == wanted), None)


def _tracked_update(tracked: fx.Node | None, site: fx.Node) -> fx.Node | None:
    """Dynamo's ``num_batches_tracked.add_(1)`` for this site, if it is in the graph."""
    if tracked is None:
        return None
    for user in tracked.users:
        in_place = (user.op == "call_method" and user.target == "add_") or user.target in (
            torch.Tensor.add_,
            torch.ops.aten.add_.Tensor,
        )
        if in_place and user.args[0] is tracked and not user.users:
            return user
        if user.target is torch.ops.aten.add.Tensor and user.args[:2] == (tracked, 1):
            return user
    return None


def module_path(node: fx.Node) -> str:
    """The path of the module that made ``node``, as Dynamo or export recorded it
    (``L['self'].layer1[0].bn1`` -> ``layer1.0.bn1``); else the node's name."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return node.name
    path = list(stack.values())[-1][0]
    path = re.sub(r"^L\['[^']*'\]\.?", "", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    path = re.sub(r"\['([^']*)'\]", r".\1", path)
    return path.lstrip(".") or node.name


@dataclass(frozen=True)
class RewrittenSite:
    """A batch-norm site a bnfx rewrite made earlier (a saved program, a transformed graph)."""

    name: str
    form: str
    action: str  # "ghost", "sync", "frozen"
    ghost_batch_size: int | None = None


def rewritten_sites(gm: fx.GraphModule) -> list[RewrittenSite]:
    """The calls of bnfx's ops and run-time functions in ``gm`` and the graphs nested in it."""
    from bnfx import functional as f

    by_function = {
        f.ghost_batch_norm_module: ("ghost", 2), f.ghost_own_forward: ("ghost", 1), f.ghost_batch_norm_of: ("ghost", 9),
        f.sync_batch_norm_module: ("sync", None), f.sync_own_forward: ("sync", None),
        f.sync_batch_norm_of: ("sync", None), f.frozen_batch_norm_module: ("frozen", None),
        f.frozen_own_forward: ("frozen", None),
    }
    found = []
    for graph in graph_modules(gm):
        for node in graph.graph.nodes:
            if node.op != "call_function":
                continue
            # Dynamo records the packet where the run-time functions call it
            op = getattr(node.target, "default", node.target)
            if op in (B.ghost_batch_norm.default, B.sync_batch_norm.default):
                a = schema_arguments(op, node.args, node.kwargs)
                ghost = op is B.ghost_batch_norm.default
                form = str(op).removesuffix(".default")
                found.append(RewrittenSite(module_path(node), form, "ghost" if ghost else "sync",
                                           a["ghost_batch_size"] if ghost else None))
            elif node.target in by_function:
                action, size_at = by_function[node.target]
                module = node.args[0]
                name = module.target if isinstance(module, fx.Node) and module.op == "get_attr" else node.name
                size = node.args[size_at] if size_at else None
                found.append(RewrittenSite(name, node.target.__name__, action, size))
    return found
