"""Every aten form of batch norm, written into a graph as its IR writes it: found, rewritten
(or left alone with the reason) and, rewritten, equal to the module-level ghost rewrite."""

import copy
import operator

import pytest
import torch
from torch import fx, nn

import bnfx
from graph_counts import count

A = torch.ops.aten
GHOST_OP = torch.ops.bnfx.ghost_batch_norm.default
# op -> (it writes the running statistics in place, it returns them, it is a training form)
FORMS = {
    A.batch_norm.default: (True, False, None),
    A.native_batch_norm.default: (True, False, None),
    A._native_batch_norm_legit.default: (True, False, None),
    A._native_batch_norm_legit_functional.default: (False, True, None),
    A._batch_norm_with_update.default: (True, False, True),
    A._batch_norm_with_update_functional.default: (False, True, True),
    A._batch_norm_no_update.default: (False, False, False),
    A._native_batch_norm_legit_no_training.default: (False, False, False),
    A.cudnn_batch_norm.default: (True, False, True),  # eval would need cuDNN: trained only here
}


def form_graph(op, training: bool, bn: nn.BatchNorm2d) -> fx.GraphModule:
    """``bn`` as ``op`` spells it: arguments by schema name, the counter's ``add_``, and, for
    the functional forms, the new running statistics copied back as AOTAutograd does. The
    graph holds ``bn``'s own tensors."""
    root = nn.Module()
    root.bn = bn
    graph = fx.Graph()
    x = graph.placeholder("x")
    state = {name: graph.get_attr(f"bn.{name}") for name in ("weight", "bias", "running_mean", "running_var")}
    tracked = graph.get_attr("bn.num_batches_tracked")
    values = {"input": x, **state, "training": training, "momentum": 0.3, "eps": 1e-5, "cudnn_enabled": False}
    values.update(exponential_average_factor=0.3, epsilon=1e-5)  # cudnn_batch_norm's names
    args = tuple(values[a.name] for a in op._schema.arguments)
    in_place, returns_state, _ = FORMS[op]
    if training and in_place:
        graph.call_function(A.add_.Tensor, (tracked, 1))
    if training and returns_state:  # functionalized: new state is a value, written back at the end
        new_count = graph.call_function(A.add.Tensor, (tracked, 1))
    result = graph.call_function(op, args)
    if op is A.batch_norm.default:
        out = result
    else:
        out = graph.call_function(operator.getitem, (result, 0))
    if returns_state:
        for index, name in ((-2, "running_mean"), (-1, "running_var")):
            position = len(op._schema.returns) + index
            new = graph.call_function(operator.getitem, (result, position))
            graph.call_function(A.copy_.default, (state[name], new))
        if training:
            graph.call_function(A.copy_.default, (tracked, new_count))
    graph.output(out)
    return fx.GraphModule(root, graph)


@pytest.mark.parametrize("op", list(FORMS), ids=lambda op: str(op))
def test_each_form_is_found_and_rewritten_like_the_module(op):
    torch.manual_seed(0)
    *_, form_training = FORMS[op]
    for training in (True, False) if form_training is None else (form_training,):
        bn = nn.BatchNorm2d(4, momentum=0.3)
        with torch.no_grad():
            bn.running_mean.uniform_(-1, 1)
            bn.weight.uniform_(0.5, 1.5)
        reference = nn.Sequential(copy.deepcopy(bn)).train(training)
        gm = form_graph(op, training, bn)
        [record] = bnfx.explain(gm, ghost_batch_size=4).records
        assert record.form == str(op).removesuffix(".default")
        assert record.action == ("ghost" if training else "left alone"), record

        rewritten = bnfx.transform(gm, ghost_batch_size=4)
        assert count(rewritten, GHOST_OP) == int(training)
        assert count(rewritten, op) == int(not training)
        x = torch.randn(10, 4, 3, 3)
        expected = bnfx.transform(reference, ghost_batch_size=4)(x)
        torch.testing.assert_close(rewritten(x), expected)
        for key, value in reference[0].state_dict().items():
            torch.testing.assert_close(bn.state_dict()[key], value, msg=key)


def test_a_form_whose_saved_statistics_are_read_is_left_alone_with_the_reason():
    gm = form_graph(A.native_batch_norm.default, True, nn.BatchNorm2d(4))
    output = gm.graph.output_node()
    site = next(n for n in gm.graph.nodes if n.target is A.native_batch_norm.default)
    with gm.graph.inserting_before(output):
        save_mean = gm.graph.call_function(operator.getitem, (site, 1))
    output.args = ((output.args[0], save_mean),)
    gm.recompile()
    [record] = bnfx.explain(gm, ghost_batch_size=4).records
    assert record.action == "left alone" and "saved statistics" in record.reason
