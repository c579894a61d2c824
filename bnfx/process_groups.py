"""The process group a sync site reduces over, from the ``sync`` and ``group_size`` options."""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from bnfx.torch_internals import group_timeout, resolve_process_group

# Why sync mode runs plain batch norm, as torch's SyncBatchNorm does.
NO_PROCESS_GROUP = "no initialized process group: plain batch norm"
NOT_A_MEMBER = "this rank is not in the sync group: plain batch norm"
ONE_RANK = "sync group of 1 rank: plain batch norm"
FALLBACKS = (NO_PROCESS_GROUP, NOT_A_MEMBER, ONE_RANK)

# (parent group name, block size) -> the communicator bnfx uses, created once per process.
_communicators: dict[tuple[str, int], dist.ProcessGroup] = {}


@dataclass(frozen=True)
class SyncGroup:
    """The ranks a sync site reduces over: bnfx's communicator's name and its size."""

    name: str
    size: int


def sync_group(sync, group_size: int | None, *, create: bool = True, plan: str = "",
               compare: bool = False) -> tuple[SyncGroup | None, str]:
    """``(group, "")`` to synchronize over, or ``(None, reason)`` when batch norm stays local.

    Like torch's SyncBatchNorm, no initialized process group, or a group of one rank, means
    plain batch norm. ``group_size=k`` splits the group into consecutive blocks of k ranks
    (apex's ``create_syncbn_process_group``). The first call creates bnfx's own communicator
    over this rank's block (only the block's ranks take part), so every rank of the block
    must rewrite its model (``transform``, or the first compiled step) for it to complete.
    Creating it, the ranks also compare their ``plan`` (what this rewrite does: how many sites
    it synchronizes, with which options) and raise on every rank when they differ, since their
    collectives would not match. ``create=False`` (``bnfx.explain``) checks the same and
    creates nothing: no collective, so one rank alone may call it. ``compare``: compare the
    plans even where the communicator exists (``bnfx.convert``: every call is on every rank;
    a graph's rewrite is not, since a rank recompiles for its own batch sizes).
    """
    if not (dist.is_available() and dist.is_initialized()):
        return None, NO_PROCESS_GROUP
    if type(sync) is int and sync == dist.GroupMember.NON_GROUP_MEMBER:  # new_group() off its ranks
        return None, NOT_A_MEMBER
    group = named_group(sync)
    ranks = dist.get_process_group_ranks(group)
    size = group_size or len(ranks)
    if size == 1:
        return None, ONE_RANK
    if len(ranks) % size:
        raise ValueError(
            f"group_size must divide the number of ranks in the sync group, got group_size={group_size} "
            f"for {len(ranks)} ranks"
        )
    if not create:
        return SyncGroup("(not created by bnfx.explain)", size), ""
    return SyncGroup(_communicator(group, ranks, size, plan, compare).group_name, size), ""


def named_group(sync) -> dist.ProcessGroup:
    if sync is True:
        return dist.group.WORLD
    if isinstance(sync, dist.ProcessGroup):
        return sync
    try:
        return resolve_process_group(sync)
    except Exception as error:
        raise ValueError(f"sync={sync!r} names no process group of this process") from error


def _communicator(group: dist.ProcessGroup, ranks: list[int], size: int, plan: str,
                  compare: bool) -> dist.ProcessGroup:
    """A group of this rank's block of ``size`` ranks of ``group``, for bnfx alone, created
    with ``group``'s timeout once every rank of the block showed the same ``plan``.

    Its own communicator keeps the small, blocking batch-norm collectives from queueing behind
    the large asynchronous ones that share the user's group (DDP's gradient buckets).
    """
    key = (group.group_name, size)
    index = ranks.index(dist.get_rank()) // size
    block = ranks[index * size : (index + 1) * size]
    timeout = group_timeout(group)
    if key in _communicators:
        if compare:
            _compare_plans(_communicators[key], block, plan, timeout)
        return _communicators[key]
    try:
        communicator = dist.new_group(
            block, timeout=timeout, use_local_synchronization=True, group_desc=f"bnfx_sync_{index}"
        )
    except Exception as error:
        raise _absent_ranks(block, timeout, plan, error) from error
    _compare_plans(communicator, block, plan, timeout, destroy=True)
    _communicators[key] = communicator
    return communicator


def _absent_ranks(block: list[int], timeout, plan: str, error: Exception) -> RuntimeError:
    return RuntimeError(
        f"bnfx: ranks {block} did not all rewrite for sync mode within the group's timeout ({timeout}): "
        "every rank of a sync group must rewrite the same model with the same options "
        f"(this rank: {plan}). {type(error).__name__}: {error}"
    )


def _compare_plans(communicator: dist.ProcessGroup, block: list[int], plan: str, timeout, destroy=False) -> None:
    """Raise on every rank of ``block`` unless they all show the same ``plan``."""
    try:
        plans = [None] * len(block)
        dist.all_gather_object(plans, plan, group=communicator)
    except Exception as error:
        raise _absent_ranks(block, timeout, plan, error) from error
    if len(set(plans)) > 1:
        if destroy:
            dist.destroy_process_group(communicator)
        listing = "; ".join(f"rank {rank}: {p}" for rank, p in zip(block, plans))
        raise RuntimeError(
            f"bnfx: the ranks of sync group {block} rewrote differently, so their batch-norm collectives "
            f"would not match: {listing}. Rewrite the same model with the same options on every rank"
        )
