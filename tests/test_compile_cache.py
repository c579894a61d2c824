"""Warm starts from torch's compile caches, never serving code compiled for other bnfx options
or another bnfx: fresh processes in turn on one ``TORCHINDUCTOR_CACHE_DIR``, each checked
against the eager converted model, and torch's AOTAutograd cache counters read.

Every process compiles inductor on a small model; each sequence names what its next process
must do: hit (the same options again) or miss (anything that changes the compiled code).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from gloo_world import run_world

import compile_cache_workers as workers

HERE = os.path.dirname(os.path.abspath(__file__))
GHOST_4 = {"ghost_batch_size": 4}


def _one_process(spec: dict, cache_dir: str) -> dict:
    done = subprocess.run([sys.executable, os.path.join(HERE, "compile_cache_workers.py"), json.dumps(spec), cache_dir],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _ranks(world_size: int):
    def run(spec: dict, cache_dir: str) -> dict:
        return run_world(workers.compiled_step, world_size, spec, cache_dir, timeout=600)[0]
    return run


def _expect(sequence, run, cache_dir) -> None:
    """Each ``(spec, expected)`` in turn: ``expected`` is "hit" or "miss" of the AOTAutograd
    cache, or None where either is right (a spec that fills the cache)."""
    outcomes = []
    for spec, expected in sequence:
        counters = run(spec, cache_dir)
        assert counters["autograd_cache_bypass"] == 0, (spec, counters)
        outcome = "hit" if counters["autograd_cache_hit"] and not counters["autograd_cache_miss"] else "miss"
        outcomes.append((spec, expected, outcome))
    wrong = [(spec, expected, outcome) for spec, expected, outcome in outcomes if expected not in (None, outcome)]
    assert not wrong, f"expected, got: {wrong}"


@pytest.mark.parametrize("door", ["backend", "convert"])
def test_ghost_warm_starts_hit_only_the_same_bnfx_and_options(door, tmp_path):
    spec = {"door": door, "options": GHOST_4}
    _expect([
        (spec, None),
        (spec, "hit"),
        ({**spec, "options": {"ghost_batch_size": 2}}, "miss"),
        ({**spec, "change": "version"}, "miss"),
        ({**spec, "change": "decomposition"}, "miss"),
        ({**spec, "mode": "max-autotune-no-cudagraphs"}, "miss"),
    ], _one_process, str(tmp_path))


def test_sync_warm_starts_hit_only_the_same_options(tmp_path):
    """2 ranks: ghost, then sync, then sync frozen, then sync again; a changed sync
    decomposition compiles anew."""
    spec = {"door": "backend", "options": {"sync": True}}
    _expect([
        ({"door": "backend", "options": GHOST_4}, None),
        (spec, "miss"),
        ({**spec, "options": {"sync": True, "freeze": True}}, "miss"),
        (spec, "hit"),
        ({**spec, "change": "decomposition"}, "miss"),
        ({"door": "convert", "options": {"sync": True}}, None),
        ({"door": "convert", "options": {"sync": True}}, "hit"),
    ], _ranks(2), str(tmp_path))


def test_a_sync_group_of_another_size_compiles_anew(tmp_path):
    """4 ranks: over the world, then in blocks of 2 (the same graph but for the group)."""
    _expect([
        ({"door": "backend", "options": {"sync": True}}, None),
        ({"door": "backend", "options": {"sync": True, "group_size": 2}}, "miss"),
        ({"door": "backend", "options": {"sync": True, "group_size": 2}}, "hit"),
    ], _ranks(4), str(tmp_path))
