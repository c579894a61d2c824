"""Lightning's switches with bnfx's batch norm: ``pip install 'bnfx[lightning]'``.

    Trainer(strategy="ddp", plugins=[bnfx.lightning.SyncBatchNorm()])          # sync_batchnorm=True
    Trainer(callbacks=[bnfx.lightning.GhostBatchNorm(ghost_batch_size=32)])    # any strategy
    Trainer(callbacks=[bnfx.lightning.PreciseBN(num_batches=200)])             # population statistics

All three act through ``bnfx.convert`` and ``bnfx.recompute_statistics``: the LightningModule
stays the same object with the same state_dict keys, so Lightning's checkpoints, loggers and
``torch.compile`` of the module work as without bnfx. Each class derives from the base classes
of every Lightning package installed (``lightning.pytorch`` and ``pytorch_lightning``), so
either package's Trainer accepts it.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

import torch.distributed as dist
from torch import nn

from bnfx.convert import convert, revert
from bnfx.options import resolve_options
from bnfx.population_statistics import recompute_statistics


def _installed_lightning() -> list:
    packages = []
    for name in ("lightning.pytorch", "pytorch_lightning"):
        try:
            packages.append(importlib.import_module(name))
        except ImportError:
            pass
    if not packages:
        raise ImportError(
            "bnfx.lightning needs Lightning (pytorch_lightning or lightning, 2.6 or later): "
            "pip install 'bnfx[lightning]'"
        )
    return packages


_PACKAGES = _installed_lightning()
_LAYER_SYNC = tuple(package.plugins.LayerSync for package in _PACKAGES)
_CALLBACK = tuple(package.Callback for package in _PACKAGES)


class SyncBatchNorm(*_LAYER_SYNC):
    """A ``LayerSync`` plugin for ``Trainer(plugins=[...])`` in place of ``sync_batchnorm=True``:
    every batch-norm module of the LightningModule computes statistics over the process group
    (``bnfx.convert(model, sync=True, **options)``), on CPU (gloo) as on GPU, eager or
    compiled. ``options``: ``sync`` (a group or its name; default WORLD), ``group_size``,
    ``freeze``, checked here.

    >>> Trainer(accelerator="cpu", devices=2, strategy="ddp", plugins=[bnfx.lightning.SyncBatchNorm()])
    """

    def __init__(self, **options):
        self.options = {"sync": True, **options}
        if resolve_options(self.options).mode != "sync":
            raise ValueError(f"bnfx.lightning.SyncBatchNorm takes sync options, got {options!r}")

    def apply(self, model: nn.Module) -> nn.Module:
        return convert(model, **self.options)

    def revert(self, model: nn.Module) -> nn.Module:
        return revert(model)


class GhostBatchNorm(*_CALLBACK):
    """A Callback that makes every batch-norm module of the LightningModule compute ghost batch
    norm over ``ghost_batch_size`` samples (``bnfx.convert``) while the Trainer runs, on any
    strategy, single device included; the module's own forward is back after the run.

    >>> Trainer(callbacks=[bnfx.lightning.GhostBatchNorm(ghost_batch_size=32)])
    """

    def __init__(self, ghost_batch_size: int = 32):
        resolve_options({"ghost_batch_size": ghost_batch_size})
        self.ghost_batch_size = ghost_batch_size

    def setup(self, trainer, pl_module: nn.Module, stage: str) -> None:
        convert(pl_module, ghost_batch_size=self.ghost_batch_size)

    def teardown(self, trainer, pl_module: nn.Module, stage: str) -> None:
        revert(pl_module)


class PreciseBN(*_CALLBACK):
    """A Callback that sets every batch-norm module's running statistics to the population
    statistics of ``num_batches`` training batches (``bnfx.recompute_statistics``) before the
    validation of every ``every_n_epochs``-th epoch (at the epoch's end without validation).

    Under a distributed strategy the ranks merge their batches' statistics exactly and end with
    the same running statistics (fvcore's PreciseBN, timm's ``distribute_bn``, without their
    average of per-rank averages). Every rank must see as many batches (Lightning's
    DistributedSampler does that; it pads the last rank's share with repeated samples when the
    dataset does not divide). The model gets the batch's first item, as ``forward`` would, or
    whatever ``call_model(pl_module, batch)`` gives it.

    >>> Trainer(callbacks=[bnfx.lightning.PreciseBN(num_batches=200)])
    """

    def __init__(self, num_batches: int = 200, every_n_epochs: int = 1,
                 call_model: Callable[[nn.Module, Any], Any] | None = None):
        if type(num_batches) is not int or num_batches < 1:
            raise ValueError(f"num_batches must be a positive int, got {num_batches!r}")
        if type(every_n_epochs) is not int or every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be a positive int, got {every_n_epochs!r}")
        self.num_batches, self.every_n_epochs, self.call_model = num_batches, every_n_epochs, call_model
        self._last_epoch: int | None = None

    def on_validation_start(self, trainer, pl_module: nn.Module) -> None:
        if not trainer.sanity_checking and trainer.state.fn == "fit":
            self._recompute(trainer, pl_module)

    def on_train_epoch_end(self, trainer, pl_module: nn.Module) -> None:
        self._recompute(trainer, pl_module)

    def _recompute(self, trainer, pl_module: nn.Module) -> None:
        epoch = trainer.current_epoch
        if (epoch + 1) % self.every_n_epochs or self._last_epoch == epoch:
            return
        self._last_epoch = epoch
        loader = trainer.train_dataloader
        if isinstance(loader, (dict, list, tuple)):
            raise ValueError(
                f"bnfx.lightning.PreciseBN needs one training DataLoader, got a {type(loader).__name__} of "
                f"{len(loader)}: give the population batches to bnfx.recompute_statistics yourself"
            )
        num_batches = self.num_batches
        if hasattr(loader, "__len__"):
            num_batches = min(num_batches, len(loader))
        batches = (trainer.strategy.batch_to_device(trainer.precision_plugin.convert_input(b)) for b in loader)
        distributed = trainer.world_size > 1 and dist.is_available() and dist.is_initialized()
        recompute_statistics(
            pl_module, batches, num_batches=num_batches, sync=True if distributed else None,
            call_model=self.call_model,
        )
