"""``python -m bnfx.ops``: which kernel serves bnfx's ops on each device in this install."""

from tabulate import tabulate

from bnfx.ops.device_kernels import kernel_table

print(tabulate(kernel_table(), headers=["device", "ghost_batch_norm and sync_batch_norm run", "input they take"]))
