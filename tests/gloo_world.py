"""Run a function on every rank of a gloo world of spawned CPU processes, with bounded waits."""

from __future__ import annotations

import os
import queue
import tempfile
import time
import traceback
from datetime import timedelta

import torch.distributed as dist
import torch.multiprocessing as mp

DEAD = "exited without a result"


class RankFailed(AssertionError):
    pass


def run_world(fn, world_size: int, *args, timeout: float = 240.0, pg_timeout: float = 60.0) -> list:
    """``[fn(rank, world_size, *args) for each rank]``, each computed in its own process.

    The processes meet through a ``file://`` rendezvous in a fresh directory (no ports). A
    rank that raises fails the call with its traceback; a rank that exits without a result
    gets ``DEAD`` in its place; past ``timeout`` seconds every process is killed.
    """
    context = mp.get_context("spawn")
    results = context.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init = f"file://{os.path.join(tmp, 'rendezvous')}"
        procs = [
            context.Process(target=_rank_main, args=(fn, rank, world_size, init, pg_timeout, results, args))
            for rank in range(world_size)
        ]
        for p in procs:
            p.start()
        outcomes: dict[int, tuple[str, object]] = {}
        deadline = time.monotonic() + timeout
        try:
            while len(outcomes) < world_size:
                try:
                    rank, status, value = results.get(timeout=0.5)
                    outcomes[rank] = (status, value)
                    continue
                except queue.Empty:
                    pass
                for rank, p in enumerate(procs):
                    if rank not in outcomes and not p.is_alive() and results.empty():
                        outcomes[rank] = ("dead", p.exitcode)
                if time.monotonic() > deadline:
                    raise TimeoutError(f"gloo world of {world_size} ranks still running after {timeout:.0f} s")
        finally:
            for p in procs:
                p.join(timeout=10)
                if p.is_alive():
                    p.kill()
                    p.join()
    failures = [f"rank {r}:\n{v}" for r, (s, v) in sorted(outcomes.items()) if s == "error"]
    if failures:
        raise RankFailed("\n".join(failures))
    return [outcomes[r][1] if outcomes[r][0] == "ok" else DEAD for r in range(world_size)]


def _rank_main(fn, rank, world_size, init, pg_timeout, results, args):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=init, rank=rank, world_size=world_size, timeout=timedelta(seconds=pg_timeout)
    )
    try:
        results.put((rank, "ok", fn(rank, world_size, *args)))
    except BaseException:  # noqa: BLE001 - reported to the parent with its traceback
        results.put((rank, "error", traceback.format_exc()))
    finally:
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - a peer may be gone already
            pass
