"""The passes on ``torch.export`` programs: a rewritten ExportedProgram with a valid signature."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import operator

from torch import fx
from torch.export import ExportedProgram
from torch.export.graph_signature import ExportGraphSignature, InputKind, OutputKind, TensorArgument

from bnfx.passes import Report
from bnfx.passes.subgraphs import graph_modules
from bnfx.rewriting import rewrite_graph
from bnfx.torch_internals import detect_fake_mode, exported_program


def transform_exported(ep: ExportedProgram, options, rewrite=rewrite_graph) -> tuple[ExportedProgram, Report]:
    """``ep`` with its batch-norm sites rewritten; ``ep`` itself is not modified.

    Both IRs: the training IR (``aten.batch_norm``, buffers updated in place, where the
    rewrite writes the new state back with ``copy_``) and the decomposed IR
    (``aten._native_batch_norm_legit_functional``, whose new state the program returns as
    BUFFER_MUTATION outputs, now taken from the bnfx op).
    """
    gm = copy.deepcopy(ep.graph_module)
    report = rewrite(gm, options)
    _fill_fake_values(gm)
    signature = _without_unchanged_buffers(renamed_signature(ep.graph_signature, gm), gm)
    return program_like(ep, gm, signature), report


def program_like(ep: ExportedProgram, gm: fx.GraphModule, signature: ExportGraphSignature, *,
                 state_dict: dict | None = None, constants: dict | None = None) -> ExportedProgram:
    """A new ExportedProgram: ``ep`` with the graph ``gm`` (whose outputs ``signature`` names)
    and, where given, other state."""
    return exported_program(
        root=gm,
        graph=gm.graph,
        graph_signature=renamed_signature(signature, gm),
        state_dict=ep.state_dict if state_dict is None else state_dict,
        range_constraints=ep.range_constraints,
        module_call_graph=copy.deepcopy(ep.module_call_graph),
        example_inputs=ep.example_inputs,
        constants=ep.constants if constants is None else constants,
        verifiers=ep.verifiers,
    )


def _fill_fake_values(gm: fx.GraphModule) -> None:
    """``meta["val"]`` for the nodes the passes added (in ``gm`` and the graphs nested in it),
    from the ops' fake kernels."""
    nodes = [node for graph in graph_modules(gm) for node in graph.graph.nodes]
    fake_mode = detect_fake_mode([n.meta["val"] for n in nodes if "val" in n.meta])

    def value(arg):
        return arg.meta["val"] if isinstance(arg, fx.Node) else arg

    # The program's guards were settled by export; the ops check their arguments again when
    # they run, so the conditions their fake kernels test (a dynamic batch's chunk layout)
    # must not become guards of the program (ExportedProgram reads them from the shape env).
    shape_env = fake_mode.shape_env
    no_guards = shape_env.suppress_guards() if shape_env is not None else contextlib.nullcontext()
    with fake_mode, no_guards:
        for node in nodes:
            if node.op != "call_function" or "val" in node.meta:
                continue
            args = fx.node.map_arg(node.args, value)
            kwargs = fx.node.map_arg(node.kwargs, value)
            if node.target is operator.getitem:
                node.meta["val"] = args[0][args[1]]
            else:
                node.meta["val"] = node.target(*args, **kwargs)


def renamed_signature(signature: ExportGraphSignature, gm: fx.GraphModule) -> ExportGraphSignature:
    """The signature naming the graph's nodes as they are now: copying a graph renames
    placeholders that shadow builtins (``input``), and rewrites replace returned nodes."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    returned = gm.graph.output_node().args[0]
    return ExportGraphSignature(
        input_specs=[_named(spec, node) for spec, node in zip(signature.input_specs, placeholders)],
        output_specs=[_named(spec, node) for spec, node in zip(signature.output_specs, returned)],
    )


def _without_unchanged_buffers(signature: ExportGraphSignature, gm: fx.GraphModule) -> ExportGraphSignature:
    """Drop the buffer mutations that return the buffer itself (frozen sites): a write of a
    buffer onto itself would bump its version under autograd, which batch norm's backward
    refuses once it saved the buffer."""
    inputs = {spec.arg.name: spec.target for spec in signature.input_specs if spec.kind == InputKind.BUFFER}
    output = gm.graph.output_node()
    kept = [
        (spec, node)
        for spec, node in zip(signature.output_specs, output.args[0])
        if not (spec.kind == OutputKind.BUFFER_MUTATION and inputs.get(getattr(node, "name", None)) == spec.target)
    ]
    if len(kept) == len(signature.output_specs):
        return signature
    output.args = (tuple(node for _, node in kept),)
    gm.graph.lint()
    gm.recompile()
    return ExportGraphSignature(input_specs=signature.input_specs, output_specs=[spec for spec, _ in kept])


def _named(spec, node):
    if isinstance(spec.arg, TensorArgument) and isinstance(node, fx.Node):
        return dataclasses.replace(spec, arg=TensorArgument(name=node.name))
    return spec
