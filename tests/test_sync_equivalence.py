"""Sync batch norm on 2 and 3 gloo processes equals plain batch norm on the concatenated batch."""

import pytest

import sync_workers
from gloo_world import DEAD, run_world

SPLITS = {"8+8": [8, 8], "5+11": [5, 11], "6+0+9": [6, 0, 9]}


@pytest.fixture(scope="module")
def outcomes():
    """Per split, every rank's ``{"variant/door": failure or None}``; one world per split."""
    cache = {}

    def get(split):
        if split not in cache:
            sizes = SPLITS[split]
            cache[split] = run_world(sync_workers.equivalence, len(sizes), sizes, timeout=420)
        return cache[split]

    return get


@pytest.mark.parametrize("door", sync_workers.DOORS)
@pytest.mark.parametrize("variant", list(sync_workers.VARIANTS))
@pytest.mark.parametrize("split", list(SPLITS))
def test_matches_plain_batch_norm_on_the_concatenated_batch(outcomes, split, variant, door):
    case = f"{variant}/{door}"
    failures = []
    for rank, failed in enumerate(outcomes(split)):
        if failed == DEAD:
            failures.append(f"rank {rank} died")
        elif failed[case]:
            failures.append(f"rank {rank}: {failed[case]}")
    assert not failures, "\n".join(failures)
