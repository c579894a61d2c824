"""Sync mode in the forms users write, on 2 gloo processes: torch.compile over DDP for every
model structure, DDP over a transformed nn.Sequential, dynamic shapes, explain on one rank."""

import pytest

import sync_workers
from gloo_world import run_world

# sites in each form: Sequential 2, user-defined class 3, torchvision resnet18 20
SITES = {"sequential": 2, "user": 3, "torchvision": 20, "checkpointed": 3, "checkpointed-reentrant": 3}


@pytest.mark.parametrize("form", list(SITES))
def test_compile_over_ddp_equals_one_process_on_the_concatenated_batch(form):
    for rewritten in run_world(sync_workers.compiled_ddp_forms, 2, form, "aot_eager"):
        assert rewritten == SITES[form]


def test_the_readme_form_with_the_default_inner_compiler():
    # README: compiled = torch.compile(DDP(model), backend="bnfx", options={"sync": True})
    for rewritten in run_world(sync_workers.compiled_ddp_forms, 2, "sequential", "inductor", timeout=600):
        assert rewritten == SITES["sequential"]


def test_checkpointed_blocks_with_inductor():
    # the checkpointed regions are recomputed in inductor's backward, collectives included
    for rewritten in run_world(sync_workers.compiled_ddp_forms, 2, "checkpointed", "inductor", timeout=600):
        assert rewritten == SITES["checkpointed"]


def test_ddp_over_a_transformed_sequential():
    run_world(sync_workers.transformed_ddp_sequential, 2)


@pytest.mark.parametrize("inner", ["eager", "aot_eager", "inductor"])
def test_dynamic_shapes_rewrite_every_site_in_the_first_graph(inner):
    for graphs in run_world(sync_workers.dynamic_sync, 2, inner, timeout=600):
        assert graphs and graphs[0] == (3, 3), graphs
        assert all(found == rewritten == 3 for found, rewritten in graphs), graphs


def test_explain_on_one_rank_makes_no_collective_call():
    result = run_world(sync_workers.explain_on_one_rank, 2, timeout=120, pg_timeout=30)[0]
    assert result["details"] == ["over 2 ranks"] * 3
    assert result["seconds"] < 10, result


@pytest.mark.parametrize("variant", ["BatchNorm1d", "BatchNorm1d-sequence", "BatchNorm2d", "BatchNorm3d"])
@pytest.mark.parametrize("sizes", [[6, 1], [6, 0]], ids=["one-sample", "empty"])
def test_compile_with_a_rank_of_one_sample_or_none(variant, sizes):
    run_world(sync_workers.small_rank_batches, 2, variant, sizes, timeout=300)
