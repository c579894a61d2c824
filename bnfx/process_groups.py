"""The process group a sync site reduces over, from the ``sync`` and ``group_size`` options."""

from __future__ import annotations

import torch.distributed as dist

# (parent group name, group_size or None) -> the communicator bnfx uses, created once per process.
_communicators: dict[tuple[str, int | None], dist.ProcessGroup] = {}


def sync_group(sync, group_size: int | None) -> tuple[dist.ProcessGroup | None, str]:
    """``(group, "")`` to synchronize over, or ``(None, reason)`` when batch norm stays local.

    Like torch's SyncBatchNorm, no initialized process group, or a group of one rank, means
    plain batch norm. ``group_size=k`` splits the group into consecutive blocks of k ranks
    (apex's ``create_syncbn_process_group``). The first call creates bnfx's own communicator
    over this rank's block (only the block's ranks take part), so every rank of the block
    must rewrite its model (``transform``, or the first compiled step) for it to complete.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return None, "no initialized process group: plain batch norm"
    if type(sync) is int and sync == dist.GroupMember.NON_GROUP_MEMBER:  # new_group() off its ranks
        return None, "this rank is not in the sync group: plain batch norm"
    group = _named_group(sync)
    if (group_size or group.size()) == 1:
        return None, "sync group of 1 rank: plain batch norm"
    return _communicator(group, group_size), ""


def _named_group(sync) -> dist.ProcessGroup:
    if sync is True:
        return dist.group.WORLD
    if isinstance(sync, dist.ProcessGroup):
        return sync
    try:
        return dist.distributed_c10d._resolve_process_group(sync)
    except Exception as error:
        raise ValueError(f"sync={sync!r} names no process group of this process") from error


def _communicator(group: dist.ProcessGroup, group_size: int | None) -> dist.ProcessGroup:
    """A group of this rank's block of ``group`` (all of it without ``group_size``), for bnfx alone.

    Its own communicator keeps the small, blocking batch-norm collectives from queueing behind
    the large asynchronous ones that share the user's group (DDP's gradient buckets).
    """
    key = (group.group_name, group_size)
    if key in _communicators:
        return _communicators[key]
    ranks = dist.get_process_group_ranks(group)
    size = group_size or len(ranks)
    if len(ranks) % size:
        raise ValueError(
            f"group_size must divide the number of ranks in the sync group, got group_size={group_size} "
            f"for {len(ranks)} ranks"
        )
    index = ranks.index(dist.get_rank()) // size
    block = ranks[index * size : (index + 1) * size]
    _communicators[key] = dist.new_group(block, use_local_synchronization=True, group_desc=f"bnfx_sync_{index}")
    return _communicators[key]
