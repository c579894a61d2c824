"""A model whose blocks run under activation checkpointing, as training scripts write it; its
``checkpointing`` flag off, the same model without it (the reference)."""

import torch
import torch.utils.checkpoint
from torch import nn


class Block(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


class CheckpointedBlocks(nn.Module):
    def __init__(self, channels: int = 3, use_reentrant: bool = False):
        super().__init__()
        self.blocks = nn.ModuleList([Block(channels), Block(channels)])
        self.head = nn.BatchNorm2d(channels)  # outside every checkpointed region
        self.use_reentrant = use_reentrant
        self.checkpointing = True

    def forward(self, x):
        for block in self.blocks:
            if self.checkpointing:
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=self.use_reentrant)
            else:
                x = block(x)
        return self.head(x)


def without_checkpointing(model: CheckpointedBlocks) -> CheckpointedBlocks:
    model.checkpointing = False
    return model
