"""Freeze a batch-norm site: normalize with its running statistics, update nothing, no
gradient to weight or bias (MegEngine's ``freeze=True``), at the site's own IR level."""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx

from bnfx.functional import frozen_batch_norm_module, frozen_own_forward
from bnfx.passes.rewrite import replace_module_site, reroute_outputs
from bnfx.passes.sites import OP_FORMS, BatchNormSite, output_name, tuple_outputs

A = torch.ops.aten
_EVAL_OUTPUTS = OP_FORMS["aten._native_batch_norm_legit_no_training"].outputs


def has_running_stats(site: BatchNormSite) -> bool:
    if site.form == "call_module":
        return site.module.running_mean is not None
    return site.running_mean is not None


def freeze_site(gm: fx.GraphModule, site: BatchNormSite, name: str) -> None:
    """``site`` -> eval-mode batch norm with detached weight and bias; the counter update is
    dropped, and where the graph returns new running statistics (decomposed export's
    buffer mutations) it returns the unchanged ones."""
    if site.form == "call_module":
        replace_module_site(gm, site, (frozen_batch_norm_module, frozen_own_forward), (), name)
        return
    graph, node = gm.graph, site.node
    aten = site.form.startswith("aten.")
    # Exported (aten) graphs admit aten ops only; Dynamo's graphs are torch-level.

    def detach(param):
        if param is None:
            return None
        return graph.call_function(A.detach.default, (param,)) if aten else graph.call_method("detach", (param,))

    with graph.inserting_before(node):
        weight, bias = detach(site.weight), detach(site.bias)
        if not aten:
            new = graph.call_function(F.batch_norm, (site.input, site.running_mean, site.running_var,
                                                     weight, bias, False, 0.0, site.eps))
        elif site.form == "aten.batch_norm":
            new = graph.call_function(A.batch_norm.default, (site.input, weight, bias, site.running_mean,
                                                             site.running_var, False, 0.0, site.eps, False))
        else:  # a tuple form; the callers left alone those whose reserve output is read
            new = graph.call_function(A._native_batch_norm_legit_no_training.default, (
                site.input, weight, bias, site.running_mean, site.running_var, 0.0, site.eps))
    new.name = name
    new.meta = dict(node.meta)
    if tuple_outputs(site):
        reroute_outputs(graph, site, _frozen_outputs(graph, site, new, _EVAL_OUTPUTS if aten else ("out",)))
    else:
        node.replace_all_uses_with(new)
        graph.erase_node(node)
    update = site.tracked_update
    if update is not None:
        update.replace_all_uses_with(site.num_batches_tracked)  # decomposed export returns it
        graph.erase_node(update)


def _frozen_outputs(graph: fx.Graph, site: BatchNormSite, new: fx.Node, new_outputs: tuple[str, ...]):
    """``reroute_outputs``' replacement: the users of ``new``'s outputs (``new_outputs``, by name)
    take them; those of the new running statistics take the unchanged ones. Where the graph
    writes them back itself (Dynamo's ``copy_`` after ``bnfx.module_batch_norm``), the
    write-back goes: a buffer copied onto itself would change its version, and a backward that
    saved it would fail."""
    unchanged = {
        "new_running_mean": site.running_mean,
        "new_running_var": site.running_var,
        "new_num_batches_tracked": site.num_batches_tracked,
    }

    def replacement(output: str, user: fx.Node) -> fx.Node:
        if output in unchanged:
            for write_back in [u for u in user.users if _is_copy_into(u, unchanged[output])]:
                graph.erase_node(write_back)
            return unchanged[output]
        if len(new_outputs) == 1:
            return new
        with graph.inserting_after(new):
            taken = graph.call_function(operator.getitem, (new, new_outputs.index(output)))
        taken.meta = dict(user.meta)
        return taken

    return replacement


def _is_copy_into(node: fx.Node, state: fx.Node) -> bool:
    copies = node.target in ("copy_", torch.Tensor.copy_, A.copy_.default)
    return copies and node.args[0] is state and not node.users
