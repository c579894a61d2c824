"""A small LightningModule and DataModule (importable by Lightning's spawned ranks), and the
single-process loop the Lightning runs are compared with."""

from __future__ import annotations

import os

import torch
from torch import nn
from pytorch_lightning import Callback
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

SAMPLES, BATCH, LR = 24, 3, 0.1  # per-rank batches of 3: 4 steps an epoch on 2 ranks


def network() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4, momentum=None),
        nn.Flatten(), nn.Linear(4 * 4 * 4, 2),
    ).double()


def dataset() -> TensorDataset:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(SAMPLES, 3, 6, 6, generator=generator, dtype=torch.float64) * 3 + 2
    return TensorDataset(x, torch.randn(SAMPLES, 2, generator=generator, dtype=torch.float64))


def classes(package: str):
    """The LightningModule and DataModule classes of ``package`` ("pytorch_lightning" or
    "lightning.pytorch")."""
    import importlib

    L = importlib.import_module(package)

    class Regression(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = network()

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, _index):
            x, y = batch
            return nn.functional.mse_loss(self(x), y)

        def validation_step(self, batch, _index):
            x, y = batch
            return nn.functional.mse_loss(self(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=LR, momentum=0.9)

    class Data(L.LightningDataModule):
        def train_dataloader(self):
            return DataLoader(dataset(), batch_size=BATCH)

        def val_dataloader(self):
            return DataLoader(dataset(), batch_size=BATCH)

    return Regression, Data


# Module-level classes, which Lightning's spawned ranks unpickle
Regression, Data = classes("pytorch_lightning")
Regression.__qualname__, Data.__qualname__ = "Regression", "Data"


def reference_training(model: nn.Module, epochs: int, world_size: int) -> nn.Module:
    """``model`` trained as one process on each step's batches of every rank, concatenated.
    Rank r's batches are those of the DistributedSampler Lightning gives it (shuffled with
    seed 0, reshuffled each epoch); one process is fed in order."""
    data = dataset()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    for epoch in range(epochs):
        shares = []
        for rank in range(world_size):
            sampler = DistributedSampler(data, num_replicas=world_size, rank=rank, shuffle=world_size > 1, seed=0)
            sampler.set_epoch(epoch)
            shares.append(list(sampler))
        for start in range(0, len(shares[0]), BATCH):
            indices = [i for share in shares for i in share[start : start + BATCH]]
            x, y = data[indices]
            loss = nn.functional.mse_loss(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model


class CompiledRegression(Regression):
    """The network compiled in place (``nn.Module.compile``) on each rank, before Lightning's setup."""

    def configure_model(self):
        self.net.compile(backend="aot_eager", fullgraph=True)


class SaveState(Callback):
    """Writes each rank's final state_dict, and the number of graphs Dynamo compiled, to
    ``directory/rank{r}.pt``."""

    def __init__(self, directory: str):
        self.directory = directory

    def on_fit_end(self, trainer, pl_module):
        from torch._dynamo.utils import counters

        state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        state["graphs"] = counters["stats"]["unique_graphs"]
        torch.save(state, os.path.join(self.directory, f"rank{trainer.global_rank}.pt"))
