"""Model factories for the command-line tests (``bnfx inspect cli_models:NAME``)."""

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
