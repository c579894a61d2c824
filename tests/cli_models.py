"""Model factories for the command-line tests (``bnfx inspect cli_models:NAME``)."""

import torch
from torch import nn


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(3)

    def forward(self, x):
        return self.bn(x) if x.sum() > 0 else x


def untraceable():
    return DataDependent()


def not_a_model():
    return 3


def broken():
    raise FileNotFoundError("no weights here")


def seeded_convnet():
    """The same weights and running statistics on every call."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3, groups=4),
                          nn.BatchNorm2d(4))
    for module in (model[1], model[4]):
        module.running_mean.normal_()
        module.running_var.uniform_(0.5, 2.0)
    return model
