"""An in-process gloo world of one rank, for tests that need a process group but no peers."""

import contextlib
import os
import tempfile

import torch.distributed as dist


@contextlib.contextmanager
def world_of_one():
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'rendezvous')}", rank=0, world_size=1)
        try:
            yield dist.group.WORLD
        finally:
            dist.destroy_process_group()
