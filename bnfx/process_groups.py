"""The process group a sync site reduces over, from the ``sync`` and ``group_size`` options."""

from __future__ import annotations

import torch.distributed as dist

# (parent group name, group_size) -> this rank's block group, created once per process.
_blocks: dict[tuple[str, int], dist.ProcessGroup] = {}


def sync_group(sync, group_size: int | None) -> tuple[dist.ProcessGroup | None, str]:
    """``(group, "")`` to synchronize over, or ``(None, reason)`` when batch norm stays local.

    Like torch's SyncBatchNorm, no initialized process group, or a group of one rank, means
    plain batch norm. ``group_size=k`` splits the group into consecutive blocks of k ranks
    (apex's ``create_syncbn_process_group``); each rank creates only its own block's group.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return None, "no initialized process group: plain batch norm"
    group = _named_group(sync)
    if group is None or group == dist.GroupMember.NON_GROUP_MEMBER:
        return None, "this rank is not in the sync group: plain batch norm"
    if group_size is not None:
        group = _block_group(group, group_size)
    if group.size() == 1:
        return None, "sync group of 1 rank: plain batch norm"
    return group, ""


def _named_group(sync) -> dist.ProcessGroup | None:
    if sync is True:
        return dist.group.WORLD
    if isinstance(sync, dist.ProcessGroup):
        return sync
    try:
        return dist.distributed_c10d._resolve_process_group(sync)
    except Exception as error:
        raise ValueError(f"sync={sync!r} names no process group of this process") from error


def _block_group(group: dist.ProcessGroup, group_size: int) -> dist.ProcessGroup:
    key = (group.group_name, group_size)
    if key in _blocks:
        return _blocks[key]
    ranks = dist.get_process_group_ranks(group)
    if len(ranks) % group_size:
        raise ValueError(
            f"group_size must divide the number of ranks in the sync group, got group_size={group_size} "
            f"for {len(ranks)} ranks"
        )
    index = ranks.index(dist.get_rank()) // group_size
    block = ranks[index * group_size : (index + 1) * group_size]
    _blocks[key] = dist.new_group(block, use_local_synchronization=True, group_desc=f"bnfx_sync_block_{index}")
    return _blocks[key]
