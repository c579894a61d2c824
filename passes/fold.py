"""Fold eval-mode batch norm into the convolution or linear layer that produces its input."""

from __future__ import annotations

import itertools
import operator
from dataclasses import dataclass
from typing import Callable, Protocol

import torch
from torch import fx, nn

from bnfx.call_arguments import schema_arguments
from bnfx.passes.report import Report
from bnfx.passes.rewrite import TRAINING_IN_GRAPH, USES_SAVED_STATISTICS, has_own_forward
from bnfx.passes.sites import BatchNormSite, find_sites, module_path, output_name
from bnfx.torch_internals import op_arguments

A = torch.ops.aten

# Why a site stays batch norm (``bnfx.explain_fold``'s detail).
TRAINING = "training mode: normalizes with batch statistics"
NO_RUNNING_STATS = "no running statistics: normalizes with batch statistics"
OWN_FORWARD = "its module has its own forward"
UNINITIALIZED = "uninitialized lazy module"
STATS_NOT_CONSTANT = "its running statistics or affine parameters are not constants of the graph"
NOT_FOLDABLE_PRODUCER = "its input does not come from a convolution or linear layer"


class Constants(Protocol):
    """Where a graph keeps its constant tensors: get_attr targets, or an exported program's state."""

    def value(self, node) -> torch.Tensor | None:
        """The tensor ``node`` always reads, or None when it is computed or a graph input."""

    def only_reader(self, node, reader: fx.Node) -> bool:
        """``reader`` is the only place the tensor of ``node`` is read."""

    def set(self, node: fx.Node, tensor: torch.Tensor) -> None:
        """Make ``node`` read ``tensor`` from now on."""

    def add(self, tensor: torch.Tensor, like: fx.Node, before: fx.Node) -> fx.Node:
        """A new constant node reading ``tensor``, of the weight ``like``'s kind, named as its bias."""

    def remove_unused(self, node: fx.Node) -> None:
        """Drop ``node`` and its tensor if nothing reads it any more."""


@dataclass
class _Producer:
    """A convolution or linear layer whose weight and bias the batch norm folds into."""

    node: fx.Node
    name: str
    kind: str  # "conv", "conv_transpose" or "linear"
    weight: torch.Tensor
    bias: torch.Tensor | None
    groups: int
    install: Callable[[torch.Tensor, torch.Tensor], None]  # writes the folded weight and bias


def fold_batch_norm(gm: fx.GraphModule, constants: Constants, report: Report) -> fx.GraphModule:
    """Fold every eval batch-norm site of ``gm`` whose producer qualifies; record every site."""
    for site in find_sites(gm, nested=False):
        producer = _producer(gm, site, constants)
        if isinstance(producer, str):
            report.left_alone(site, producer)
            continue
        affine = _eval_affine(site, constants)
        if isinstance(affine, str):
            report.left_alone(site, affine)
            continue
        folded = _folded(producer, *affine)
        if isinstance(folded, str):
            report.left_alone(site, folded)
            continue
        producer.install(*folded)
        _bypass(gm, site, producer.node, constants)
        report.rewritten(site, "folded", f"into {producer.name}")
    gm.delete_all_unused_submodules()
    gm.graph.lint()
    gm.recompile()
    return gm


def _eval_affine(site: BatchNormSite, constants: Constants):
    """``(scale, shift)`` in float64 with ``bn(z) == z * scale + shift`` per channel, or why not."""
    if site.form == "call_module":
        module = site.module
        if has_own_forward(module):
            return OWN_FORWARD
        if isinstance(module, nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params():
            return UNINITIALIZED
        if module.training:
            return TRAINING
        if module.running_mean is None:
            return NO_RUNNING_STATS
        mean, var, weight, bias = module.running_mean, module.running_var, module.weight, module.bias
    else:
        if site.training is not False:
            return TRAINING if site.training is True else TRAINING_IN_GRAPH
        if any(output_name(site, user) not in (None, "out") for user in site.node.users):
            return USES_SAVED_STATISTICS
        if site.running_mean is None:
            return NO_RUNNING_STATS
        nodes = (site.running_mean, site.running_var, site.weight, site.bias)
        tensors = [None if node is None else constants.value(node) for node in nodes]
        if any(tensor is None and node is not None for tensor, node in zip(tensors, nodes)):
            return STATS_NOT_CONSTANT
        mean, var, weight, bias = tensors
    if not isinstance(site.eps, (int, float)):
        return "its eps is computed in the graph"
    with torch.no_grad():
        scale = (var.double() + site.eps).rsqrt()
        if weight is not None:
            scale = scale * weight.double()
        shift = -mean.double() * scale
        if bias is not None:
            shift = shift + bias.double()
    return scale, shift


def _folded(producer: _Producer, scale: torch.Tensor, shift: torch.Tensor):
    """The producer's new weight and bias, in its dtype, or why the channels do not line up."""
    weight = producer.weight
    if producer.kind == "conv_transpose":
        g = producer.groups
        channels = weight.shape[1] * g
        # [Cin, Cout/g, *k] viewed as [g, Cin/g, Cout/g, *k]: output channel (i, j) is i * Cout/g + j
        shape = (g, 1, weight.shape[1]) + (1,) * (weight.dim() - 2)
        grouped = weight.reshape(g, weight.shape[0] // g, *weight.shape[1:])
    else:
        channels = weight.shape[0]
        shape = (channels,) + (1,) * (weight.dim() - 1)
        grouped = weight
    if scale.numel() != channels:
        return f"it normalizes {scale.numel()} channels, {producer.name} makes {channels}"
    with torch.no_grad():
        scale = scale.to(weight.device)
        new_weight = (grouped.double() * scale.reshape(shape)).reshape(weight.shape)
        bias = producer.bias.double() if producer.bias is not None else 0.0
        new_bias = bias * scale + shift.to(weight.device)
    return new_weight.to(weight.dtype), new_bias.to(weight.dtype)


def _bypass(gm: fx.GraphModule, site: BatchNormSite, output: fx.Node, constants: Constants) -> None:
    """Make the site's readers read ``output``; erase the site and the constants only it read."""
    node = site.node
    for user in list(node.users):
        if user.op == "call_function" and user.target is operator.getitem:
            user.replace_all_uses_with(output)
            gm.graph.erase_node(user)
    node.replace_all_uses_with(output)
    gm.graph.erase_node(node)
    if site.form != "call_module":
        for arg in (site.weight, site.bias, site.running_mean, site.running_var, site.num_batches_tracked):
            if isinstance(arg, fx.Node):
                constants.remove_unused(arg)


# -- producers -------------------------------------------------------------------------------

_CONV_MODULES = {nn.Conv1d: "conv", nn.Conv2d: "conv", nn.Conv3d: "conv", nn.Linear: "linear",
                 nn.ConvTranspose1d: "conv_transpose", nn.ConvTranspose2d: "conv_transpose",
                 nn.ConvTranspose3d: "conv_transpose"}
# Python functions (symbolic_trace graphs) read through the schema of the aten op they call.
_FUNCTION_SCHEMAS = {
    torch.conv1d: A.conv1d.default, torch.conv2d: A.conv2d.default, torch.conv3d: A.conv3d.default,
    torch.conv_transpose1d: A.conv_transpose1d.default, torch.conv_transpose2d: A.conv_transpose2d.input,
    torch.conv_transpose3d: A.conv_transpose3d.input, torch.nn.functional.linear: A.linear.default,
}
_CONV_OPS = {A.conv1d.default, A.conv2d.default, A.conv3d.default,
             A.conv1d.padding, A.conv2d.padding, A.conv3d.padding}
_CONV_TRANSPOSE_OPS = {A.conv_transpose1d.default, A.conv_transpose2d.input, A.conv_transpose3d.input}


def _producer(gm: fx.GraphModule, site: BatchNormSite, constants: Constants) -> _Producer | str:
    """The layer that computes the site's input, ready to fold into, or why there is none."""
    node = site.input
    if not isinstance(node, fx.Node) or node.op not in ("call_module", "call_function"):
        return NOT_FOLDABLE_PRODUCER
    if node.op == "call_module":
        found = _module_producer(gm, node)
    elif node.target in (A.addmm.default, A.mm.default):
        found = _matmul_producer(node, constants)
    else:
        found = _op_producer(node, constants)
    if isinstance(found, str):
        return found
    if len(node.users) > 1:
        return f"{found.name}'s output has {len(node.users)} users, each would read the folded output"
    rank = _rank(node) if found.kind == "linear" else 2
    if rank is None:
        return f"{found.name}'s output rank is unknown: pass example_inputs"
    if rank != 2:
        return f"{found.name} makes a {rank}-d output: batch norm's channels are not its features"
    return found


def _module_producer(gm: fx.GraphModule, node: fx.Node) -> _Producer | str:
    module = gm.get_submodule(node.target)
    kind = _CONV_MODULES.get(type(module))
    if kind is None:
        return NOT_FOLDABLE_PRODUCER
    if _reads_of(gm, node.target) > 1:
        return f"{node.target} is called or read elsewhere in the graph"

    def install(weight, bias):
        module.bias = same_kind(bias, module.weight)
        module.weight = same_kind(weight, module.weight)

    return _Producer(node, node.target, kind, module.weight, module.bias, getattr(module, "groups", 1), install)


def _op_producer(node: fx.Node, constants: Constants) -> _Producer | str:
    op = _FUNCTION_SCHEMAS.get(node.target, node.target)
    if op not in _CONV_OPS | _CONV_TRANSPOSE_OPS | {A.linear.default, A.convolution.default}:
        return NOT_FOLDABLE_PRODUCER
    arguments = schema_arguments(op, node.args, node.kwargs)
    if op is A.linear.default:
        kind = "linear"
    elif op in _CONV_TRANSPOSE_OPS or (op is A.convolution.default and arguments["transposed"]):
        kind = "conv_transpose"
    else:
        kind = "conv"
    weight_node, bias_node = arguments["weight"], arguments.get("bias")
    bias_position = [a.name for a in op_arguments(op)].index("bias")

    def attach_bias(new_node):
        if bias_position <= len(node.args):
            node.args = (*node.args[:bias_position], new_node, *node.args[bias_position + 1:])
        else:
            node.update_kwarg("bias", new_node)

    return _constant_producer(
        constants, node, kind, arguments.get("groups", 1), weight_node, node, bias_node, attach_bias
    )


def _matmul_producer(node: fx.Node, constants: Constants) -> _Producer | str:
    """Decomposed linear: ``addmm(bias, x, permute(weight, [1, 0]))`` or ``mm(x, permute(...))``."""
    name = module_path(node)
    if node.target is A.addmm.default:
        bias_node, x, transposed = node.args[:3]
        if any(node.kwargs.get(k, 1) != 1 for k in ("beta", "alpha")):
            return f"{name} scales its terms (addmm beta or alpha)"
    else:
        bias_node, (x, transposed) = None, node.args[:2]
    is_transpose = isinstance(transposed, fx.Node) and (
        transposed.target is A.t.default
        or (transposed.target is A.permute.default and list(transposed.args[1]) == [1, 0])
    )
    if not is_transpose or len(transposed.users) > 1:
        return NOT_FOLDABLE_PRODUCER

    def attach_bias(new_node):
        node.target = A.addmm.default
        node.args = (new_node, x, transposed)

    return _constant_producer(constants, node, "linear", 1, transposed.args[0], transposed, bias_node, attach_bias)


def _constant_producer(constants: Constants, node: fx.Node, kind: str, groups: int, weight_node, weight_reader,
                       bias_node, attach_bias) -> _Producer | str:
    """A producer whose weight (read by ``weight_reader``) and bias are constants it alone reads;
    ``attach_bias(new_node)`` makes it read a new bias where it had none."""
    name = module_path(node)
    weight = _sole_constant(constants, weight_node, weight_reader)
    if isinstance(weight, str):
        return f"{name}'s weight {weight}"
    bias = None if bias_node is None else _sole_constant(constants, bias_node, node)
    if isinstance(bias, str):
        return f"{name}'s bias {bias}"

    def install(new_weight, new_bias):
        constants.set(weight_node, new_weight)
        if bias_node is not None:
            constants.set(bias_node, new_bias)
        else:
            attach_bias(constants.add(new_bias, like=weight_node, before=node))

    return _Producer(node, name, kind, weight, bias, groups, install)


def _sole_constant(constants: Constants, node, reader: fx.Node) -> torch.Tensor | str:
    """The constant tensor ``node`` reads for ``reader`` alone, or why it is not one."""
    value = constants.value(node) if isinstance(node, fx.Node) else None
    if value is None:
        return "is not a constant of the graph"
    if not constants.only_reader(node, reader):
        return "is shared with other layers"
    return value


def _reads_of(gm: fx.GraphModule, path: str) -> int:
    """How many nodes read the module or attribute at ``path`` or anything inside it."""

    def inside(target: str) -> bool:
        return target == path or target.startswith(path + ".") or path.startswith(target + ".")

    return sum(n.op in ("call_module", "get_attr") and inside(n.target) for n in gm.graph.nodes)


def _rank(node: fx.Node) -> int | None:
    """The number of dimensions of ``node``'s value where the graph records it."""
    for key in ("val", "example_value", "tensor_meta"):
        value = node.meta.get(key)
        if value is not None and hasattr(value, "shape"):
            return len(value.shape)
    return None


class GraphAttributes:
    """The constants of a GraphModule: the tensors its ``get_attr`` nodes read."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm

    def value(self, node) -> torch.Tensor | None:
        if node.op != "get_attr":
            return None
        value = operator.attrgetter(node.target)(self.gm)
        return value if isinstance(value, torch.Tensor) else None

    def only_reader(self, node, reader: fx.Node) -> bool:
        return list(node.users) == [reader] and _reads_of(self.gm, node.target) == 1

    def set(self, node: fx.Node, tensor: torch.Tensor) -> None:
        owner_path, _, name = node.target.rpartition(".")
        owner = self.gm.get_submodule(owner_path)
        setattr(owner, name, same_kind(tensor, getattr(owner, name)))

    def add(self, tensor: torch.Tensor, like: fx.Node, before: fx.Node) -> fx.Node:
        owner_path, _, name = like.target.rpartition(".")
        owner = self.gm.get_submodule(owner_path)
        name = next(n for n in free_names(bias_name(name)) if not hasattr(owner, n))
        value = same_kind(tensor, self.value(like))
        if isinstance(value, nn.Parameter):
            owner.register_parameter(name, value)
        else:
            owner.register_buffer(name, value)
        with self.gm.graph.inserting_before(before):
            return self.gm.graph.get_attr(f"{owner_path}.{name}" if owner_path else name)

    def remove_unused(self, node: fx.Node) -> None:
        if node.op != "get_attr" or node.users:
            return
        self.gm.graph.erase_node(node)
        if _reads_of(self.gm, node.target) == 0:
            owner_path, _, name = node.target.rpartition(".")
            delattr(self.gm.get_submodule(owner_path), name)


def same_kind(tensor: torch.Tensor, old: torch.Tensor | None) -> torch.Tensor:
    """``tensor`` as a Parameter where ``old`` is one (requiring grad as it did), else as it is."""
    if isinstance(old, nn.Parameter):
        return nn.Parameter(tensor, requires_grad=old.requires_grad)
    return tensor


def bias_name(weight_name: str) -> str:
    """The name of a folded bias kept beside ``weight_name``: ``conv1.weight`` -> ``conv1.bias``."""
    stem = weight_name.removesuffix("weight")
    return f"{stem}bias" if stem != weight_name else f"{weight_name}_bias"


def free_names(name: str):
    """``name``, then ``name_1``, ``name_2``, ...: the caller takes the first that is free."""
    return itertools.chain([name], (f"{name}_{i}" for i in itertools.count(1)))
