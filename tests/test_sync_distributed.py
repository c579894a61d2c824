"""Sync mode across gloo processes: conditioning, collectives, failures, DDP, groups, freeze."""

import pytest

import sync_workers
from gloo_world import DEAD, run_world


def test_running_var_survives_a_large_mean():
    # 1e4 + 1e-2 randn over 2 ranks: the variance is 1e-12 of the mean's square
    results = run_world(sync_workers.conditioning, 2)
    for errors in results:
        assert errors["bnfx"] < 1e-2, errors
        # the same data through raw float32 sums: the reference can tell the difference
        assert errors["raw_float32_sums"] > 1e-2, errors


@pytest.mark.parametrize("door", sync_workers.DOORS)
def test_one_collective_per_site_and_direction(door):
    results = run_world(sync_workers.collective_counts, 2, door)
    sites = 3
    for counts in results:
        assert counts == {"forward": sites, "step": 2 * sites}, counts


def test_a_dead_peer_raises_instead_of_hanging():
    results = run_world(sync_workers.peer_dies, 2, timeout=120, pg_timeout=10)
    assert results[1] == DEAD
    assert results[0]["raised"], results[0]
    assert results[0]["seconds"] < 30, results[0]


@pytest.mark.parametrize("door", sync_workers.DOORS)
@pytest.mark.parametrize("mismatch", ["options", "sites"])
def test_ranks_that_rewrite_differently_raise_on_every_rank(mismatch, door):
    results = run_world(sync_workers.mismatched_ranks, 2, mismatch, door, timeout=120, pg_timeout=10)
    for rank, result in enumerate(results):
        message = result["message"]
        assert message and "rewrote differently" in message, result
        assert "rank 0: 1 synchronized and 0 frozen" in message, message
        expected = "rank 1: 0 synchronized and 1 frozen" if mismatch == "options" else "rank 1: 2 synchronized"
        assert expected in message, message
        assert result["seconds"] < 30, result


@pytest.mark.parametrize("door", sync_workers.DOORS)
def test_distributed_data_parallel_trains_like_one_process(door):
    run_world(sync_workers.ddp, 2, door)


def test_group_size_syncs_consecutive_blocks():
    results = run_world(sync_workers.block_groups, 4)
    for result in results:
        [detail] = result["explain"]
        assert detail == "over 2 ranks", detail


@pytest.mark.parametrize("door", sync_workers.DOORS)
def test_freeze_uses_running_stats_without_collectives_or_affine_grads(door):
    for result in run_world(sync_workers.frozen, 2, door):
        assert result["gloo_events"] == 0
        assert result["weight_grad"] is None and result["bias_grad"] is None


def test_sync_over_a_subgroup_by_object_and_by_name():
    results = run_world(sync_workers.named_groups, 3)
    for rank in (0, 2):
        assert results[rank] == {"group": "over 2 ranks", "name": "over 2 ranks"}
    reason = "this rank is not in the sync group: plain batch norm"
    assert results[1] == {"group": reason, "name": reason}


@pytest.mark.parametrize("door", ["transform", "compile", "export"])
def test_converted_sync_batchnorm_model_syncs_on_cpu(door):
    for actions in run_world(sync_workers.converted_sync_batchnorm, 2, door):
        assert actions == ["sync"] * 20


@pytest.mark.parametrize("door", sync_workers.DOORS)
def test_norm_act_layers_sync_their_own_forward(door):
    for actions in run_world(sync_workers.norm_act, 2, door):
        assert actions == [("1", "sync"), ("3", "sync")]


def test_a_whole_group_of_empty_shares_is_torchs_empty_batch():
    run_world(sync_workers.whole_group_empty, 2)
