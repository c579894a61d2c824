"""Sync collectives in the same order on every rank under any compiler, and a mismatch named.

Two gloo ranks, float64, against one process on the concatenated batch (``collective_order_
workers.py``). The batch norms on resnet-style parallel branches are independent to a
compiler; the ``reordering`` backend schedules them differently on each rank on purpose.
"""

from __future__ import annotations

import operator
import os

import pytest
import torch
from torch import fx

import bnfx
from bnfx.ops import collective_tags
from bnfx.passes.sync import chain_sync_sites
from gloo_world import run_world

import collective_order_workers as workers

UNEVEN = [(5, 3), (3, 5), (7, 1), (4, 0)]


@pytest.mark.parametrize("door", ["convert-reordering", "backend-reordering"])
@pytest.mark.parametrize("name", ["branchy", "resnet18"])
def test_a_compiler_that_reorders_on_each_rank_changes_nothing(name, door):
    run_world(workers.steps_equal, 2, name, door, UNEVEN, timeout=400)


# Inductor compiles are slow here: one case per door. torch.compile's convolution backward fails
# on an empty batch (plain models too): the empty rank is tried on the model of linear
# layers ("mlp"), whose compiled backward once made one all-reduce more on the empty rank.
INDUCTOR_CASES = [
    ("convert-inductor", "branchy", UNEVEN[:3]),
    ("convert-max-autotune", "branchy", [(7, 1)]),
    ("ddp-convert-inductor", "mlp", [(5, 3), (4, 0)]),
    ("ddp-backend-inductor", "mlp", [(5, 3), (4, 0)]),
]


@pytest.mark.parametrize("door, name, layouts", INDUCTOR_CASES, ids=[door for door, _, _ in INDUCTOR_CASES])
def test_inductor_keeps_every_rank_in_step(door, name, layouts):
    run_world(workers.steps_equal, 2, name, door, layouts, timeout=600)


# The whole matrix: every inductor door, both models of parallel branches, every uneven layout
# (the empty rank on the mlp). About 40 minutes on 2 cores: run with BNFX_FULL_MATRIX=1.
INDUCTOR_DOORS = ["convert-inductor", "convert-max-autotune", "ddp-convert-inductor", "backend-inductor",
                  "ddp-backend-inductor"]
FULL_MATRIX = [(door, name, UNEVEN[:3]) for door in INDUCTOR_DOORS for name in ("branchy", "resnet18")] + [
    (door, "mlp", UNEVEN) for door in INDUCTOR_DOORS]


@pytest.mark.skipif(os.environ.get("BNFX_FULL_MATRIX") != "1", reason="the whole matrix: BNFX_FULL_MATRIX=1")
@pytest.mark.parametrize("door, name, layouts", FULL_MATRIX, ids=[f"{d}-{n}" for d, n, _ in FULL_MATRIX])
def test_every_inductor_door_keeps_every_rank_in_step(door, name, layouts):
    run_world(workers.steps_equal, 2, name, door, layouts, timeout=2400, pg_timeout=900)  # (cold compiles)


@pytest.mark.parametrize("mode", ["sync", "ghost"])
def test_inductor_fuses_a_converted_model(mode):
    forward, backward = run_world(workers.inductor_code, 2, mode)[0]
    for code in (forward, backward):
        assert "torch.ops.bnfx" not in code
    if mode == "sync":
        assert forward.count("_c10d_functional.all_reduce") == 5  # one a batch norm, and the same backward
        assert backward.count("_c10d_functional.all_reduce") == 5


@pytest.mark.parametrize("mismatch, named", [
    ("different-models", "rank 0: 5 converted"),
    ("compiled-reordered-against-eager", "site 'long.1'"),
    ("backend-against-convert", "site 'short.1'"),
])
def test_ranks_running_different_programs_raise_at_once(mismatch, named):
    results = run_world(workers.mismatched, 2, mismatch, timeout=200, pg_timeout=120)
    for rank, result in enumerate(results):
        assert result["error"] is not None, f"rank {rank} ran on"
        assert named in result["error"], result["error"]
        assert result["seconds"] < 60, result


def test_the_graph_chain_follows_the_graph_order():
    """chain_sync_sites: each sync call takes the previous one's order output."""
    graph = fx.Graph()
    x = graph.placeholder("x")
    calls = [graph.call_function(torch.ops.bnfx.sync_batch_norm.default,
                                 (x, None, None, None, None, None, 0.1, 1e-5, "0")) for _ in range(3)]
    for call in calls:
        graph.call_function(operator.getitem, (call, 0))
    graph.output(None)
    chain_sync_sites(graph)
    orders = [dict(zip([a.name for a in call.target._schema.arguments], call.args))["order"] for call in calls]
    assert orders[0] is None
    for previous, order in zip(calls, orders[1:]):
        assert order.target is operator.getitem and order.args == (previous, 7)


def test_a_mismatch_names_both_sites():
    first, second = collective_tags.site_tag("layer1.0.bn1"), collective_tags.site_tag("layer1.0.downsample.1")
    own = collective_tags.slots(first, "forward", None, torch.zeros(1))
    peer = collective_tags.slots(second, "forward", None, torch.zeros(1))
    named = r"forward all-reduce of site 'layer1\.0\.bn1'.*site 'layer1\.0\.downsample\.1'"
    with pytest.raises(RuntimeError, match=named):
        collective_tags.check(own + peer, own, 2, first, "forward", "g", traced=False)
    collective_tags.check(own * 2, own, 2, first, "forward", "g", traced=False)  # matched: nothing raised
    backward = collective_tags.slots(first, "backward", None, torch.zeros(1))
    with pytest.raises(RuntimeError, match="backward all-reduce of site 'layer1.0.bn1'"):
        collective_tags.check(own + backward, own, 2, first, "forward", "g", traced=False)


def test_convert_chains_the_model_forward_only():
    """Within a converted model's forward the links stay differentiable (the backward chains
    through them); outside it they are detached: no forward reaches into the previous one's
    autograd graph. ``revert`` removes the model's chain hooks."""
    from bnfx import collective_order

    model = bnfx.convert(torch.nn.Sequential(torch.nn.BatchNorm1d(3)), ghost_batch_size=2)
    assert not model._forward_pre_hooks  # ghost mode makes no collective: no chain
    link = torch.ones(1, requires_grad=True) * 2
    collective_order.begin()
    collective_order.put(link)
    assert collective_order.take() is link
    collective_order.end()
    assert collective_order.take() is None
    collective_order.put(link)
    assert collective_order.take().grad_fn is None
    collective_order.end()
