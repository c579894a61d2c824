"""``bnfx.fold``: eval batch norm folded into the preceding convolution or linear layer."""

from __future__ import annotations

import copy
import dataclasses
import re

import torch
from torch import fx, nn
from torch.export import ExportedProgram
from torch.export.graph_signature import ExportGraphSignature, InputKind, InputSpec, TensorArgument
from torch.fx.passes.shape_prop import ShapeProp

from bnfx.export import program_like
from bnfx.passes import Report
from bnfx.passes.fold import GraphAttributes, bias_name, fold_batch_norm, free_names, same_kind
from bnfx.torch_internals import detect_fake_mode
from bnfx.transform import trace

_STATE_KINDS = (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR)


def fold(model, *, example_inputs: tuple | None = None):
    """``model`` with every eval batch norm folded into the convolution or linear layer before it.

    ``model``: a ``torch.export.ExportedProgram`` (training IR or decomposed), whose result is a
    new ExportedProgram that saves and loads without bnfx; a GraphModule, or an nn.Module traced
    with ``bnfx.trace``, whose result is a new GraphModule with parameters of its own. Conv
    1d/2d/3d (grouped, transposed, with or without bias) and linear layers qualify; a site is
    left alone, with a WARNING naming it and the reason, when it is in training mode, its
    producer's output has other readers, or the producer's weights are not constants
    (``bnfx.explain_fold`` gives the table). The input is not modified. ``example_inputs``
    give a GraphModule without shape metadata the shapes that a linear layer's site needs.

    >>> folded = bnfx.fold(torch.export.export(model.eval(), (x,)))
    >>> torch.export.save(folded, "model_folded.pt2")
    """
    folded, report = folded_copy(model, example_inputs)
    report.warn_plain_sites()
    return folded


def explain_fold(model, *, example_inputs: tuple | None = None) -> Report:
    """What ``bnfx.fold(model)`` does to each batch-norm site; ``print`` it for a table."""
    return folded_copy(model, example_inputs)[1]


def folded_copy(model, example_inputs: tuple | None = None):
    """The folded copy of ``model`` and the report of every site."""
    report = Report(done="folded")
    if isinstance(model, ExportedProgram):
        return _folded_program(model, report), report
    if isinstance(model, nn.Module) and not isinstance(model, fx.GraphModule):
        model = trace(model)
    if not isinstance(model, fx.GraphModule):
        raise TypeError(
            f"model must be a torch.export.ExportedProgram, a torch.fx.GraphModule or an nn.Module, "
            f"got {type(model).__name__}"
        )
    gm = copy.deepcopy(model)
    if example_inputs is not None:
        ShapeProp(gm).propagate(*example_inputs)
    return fold_batch_norm(gm, GraphAttributes(gm), report), report


def _folded_program(ep: ExportedProgram, report: Report) -> ExportedProgram:
    gm = copy.deepcopy(ep.graph_module)
    state = ProgramState(ep, gm)
    fold_batch_norm(gm, state, report)
    signature = ExportGraphSignature(input_specs=state.specs, output_specs=ep.graph_signature.output_specs)
    return program_like(ep, gm, signature, state_dict=state.state_dict, constants=state.constants)


class ProgramState:
    """The constants of an exported program's graph: its lifted parameters, buffers and tensor
    constants, each a placeholder with an input spec. Changes go to copies of the program's
    state dictionaries; the program's own tensors are never written."""

    def __init__(self, ep: ExportedProgram, gm: fx.GraphModule):
        self.gm = gm
        self.specs: list[InputSpec] = list(ep.graph_signature.input_specs)
        self.state_dict = dict(ep.state_dict)
        self.constants = dict(ep.constants)

    def _spec(self, node) -> InputSpec | None:
        if not isinstance(node, fx.Node) or node.op != "placeholder":
            return None
        return next((s for s in self.specs if s.kind in _STATE_KINDS and s.arg.name == node.name), None)

    def _store(self, spec: InputSpec) -> dict:
        persistent = spec.kind == InputKind.PARAMETER or (spec.kind == InputKind.BUFFER and spec.persistent)
        return self.state_dict if persistent else self.constants

    def value(self, node) -> torch.Tensor | None:
        spec = self._spec(node)
        return None if spec is None else self._store(spec)[spec.target]

    def only_reader(self, node, reader: fx.Node) -> bool:
        return list(node.users) == [reader]

    def set(self, node: fx.Node, tensor: torch.Tensor) -> None:
        spec = self._spec(node)
        store = self._store(spec)
        store[spec.target] = same_kind(tensor, store[spec.target])

    def add(self, tensor: torch.Tensor, like: fx.Node, before: fx.Node) -> fx.Node:
        """A placeholder of ``like``'s kind, after the last one of that kind (specs keep graph order)."""
        like_spec = self._spec(like)
        taken = {s.target for s in self.specs}
        target = next(t for t in free_names(bias_name(like_spec.target)) if t not in taken)
        position = max(i for i, s in enumerate(self.specs) if s.kind == like_spec.kind)
        last = next(n for n in self.gm.graph.nodes if n.op == "placeholder" and n.name == self.specs[position].arg.name)
        with self.gm.graph.inserting_after(last):
            node = self.gm.graph.placeholder(_PREFIXES[like_spec.kind] + re.sub(r"\W", "_", target))
        fake_mode = detect_fake_mode([n.meta["val"] for n in self.gm.graph.nodes if "val" in n.meta])
        node.meta["val"] = fake_mode.from_tensor(tensor, static_shapes=True)
        spec = dataclasses.replace(like_spec, arg=TensorArgument(name=node.name), target=target)
        self.specs.insert(position + 1, spec)
        self._store(spec)[target] = same_kind(tensor, self.value(like))
        return node

    def remove_unused(self, node: fx.Node) -> None:
        spec = self._spec(node)
        if spec is None or node.users:
            return
        self.gm.graph.erase_node(node)
        self.specs.remove(spec)
        del self._store(spec)[spec.target]


# torch.export's placeholder names: p_conv1_weight, b_bn1_running_mean, c_lifted_tensor_0
_PREFIXES = {InputKind.PARAMETER: "p_", InputKind.BUFFER: "b_", InputKind.CONSTANT_TENSOR: "c_"}
