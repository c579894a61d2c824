"""``bnfx.recompute_statistics``: running statistics set to the exact population statistics of
each batch-norm site's input (PreciseBN, Wu & Johnson 2021), sync-aware.

The model runs as it is (its train/eval flags untouched, so dropout does what the user set)
under a TorchDispatchMode that catches every batch-norm op whose running mean is one of the
model's (torch's forms, the ops of a bnfx-rewritten graph, a NormAct's own call): it records
the input's per-channel count, mean and sum of squared deviations, and returns the op's
outputs normalized with the batch's statistics, updating nothing. So upstream batch norms
normalize with batch statistics (as in training, per batch: a ghost site's ghost batches
and a sync site's group are not consulted), whatever form the model takes: an nn.Module, a
``bnfx.transform`` graph, a compiled model (its original module runs), an exported program's
module. Every sample weighs the same: per-batch moments merged in float64 with Chan's
formula. With a process group, the ranks gather every site's moments of the batch in one
collective and merge them in rank order, so every rank ends with the same statistics
whatever its batch sizes.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from bnfx.call_arguments import schema_arguments
from bnfx.ops import batch_norm_contract as contract
from bnfx.passes.sites import OP_FORMS
from bnfx.process_groups import named_group
from bnfx.torch_internals import TorchDispatchMode

# Every op that computes batch norm with a module's running statistics in reach, and the
# names of its outputs: torch's forms (those the passes know), and bnfx's own ops.
_OUTPUTS = {
    **{form.op: form.outputs or ("out",) for form in OP_FORMS.values()},
    torch.ops.bnfx.ghost_batch_norm.default: contract.output_names("ghost_batch_norm"),
    torch.ops.bnfx.sync_batch_norm.default: contract.output_names("sync_batch_norm"),
}
_EPS_ARGUMENT = {form.op: form.eps_argument for form in OP_FORMS.values()}


def recompute_statistics(
    model: nn.Module,
    batches: Iterable,
    *,
    num_batches: int | None = None,
    sync=None,
    call_model: Callable[[nn.Module, Any], Any] | None = None,
) -> list[str]:
    """Set the running mean and variance of every batch-norm module of ``model`` (with
    running statistics) to the population statistics of its input over ``batches``; return
    their names.

    ``batches``: tensors, ``(input, target, ...)`` tuples (the model gets the first item), or
    anything with ``call_model(model, batch)``, e.g. dicts. ``num_batches``: stop after that
    many. ``sync``: ``True`` (WORLD), a ProcessGroup or its name: every rank of the group
    passes the same number of batches (of any size, empty too) and ends with the same
    statistics. The variance is unbiased, as torch stores it; ``num_batches_tracked`` is the
    number of batches, as torch's cumulative average (``momentum=None``) would leave it.
    Parameters, other buffers and train/eval flags are left as they were.

    >>> bnfx.recompute_statistics(model, loader, num_batches=200)
    """
    if num_batches is not None and (type(num_batches) is not int or num_batches < 1):
        raise ValueError(f"num_batches must be a positive int or None, got {num_batches!r}")
    group = None if sync is None or sync is False else named_group(sync)
    module = _eager_module(model)
    sites = _Sites(module)
    call = call_model or _call_with_input
    untouched = {name: b.clone() for name, b in module.named_buffers() if not sites.owns(b)}
    seen = 0
    with torch.no_grad():
        for batch in _progress(batches, num_batches):
            with _BatchStatistics(sites) as batch_statistics:
                call(module, batch)
            sites.merge(batch_statistics.moments, group)
            seen += 1
            if seen == num_batches:
                break
        if seen == 0:
            raise ValueError("batches must yield at least one batch, got none")
        sites.write(seen)
        for name, value in module.named_buffers():
            if name in untouched:
                value.copy_(untouched[name])
    return sites.names


def _eager_module(model) -> nn.Module:
    """The module whose Python forward runs: a compiled model's original, DDP's inner one."""
    model = getattr(model, "_orig_mod", model)
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module (or a compiled one), got {type(model).__name__}")
    return model


def _call_with_input(model: nn.Module, batch) -> Any:
    if isinstance(batch, Tensor):
        return model(batch)
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        return model(batch[0])
    raise TypeError(
        f"batches must be tensors or (input, ...) tuples, got a {type(batch).__name__}; "
        "pass call_model=lambda model, batch: model(...) for other batches"
    )


def _progress(batches: Iterable, total: int | None) -> Iterable:
    """A progress bar on a terminal (tqdm), the batches as they are elsewhere."""
    if not sys.stderr.isatty():
        return batches
    from tqdm import tqdm

    if total is None and hasattr(batches, "__len__"):
        total = len(batches)
    return tqdm(batches, total=total, desc="bnfx: population statistics", unit="batch")


@dataclass
class _Moments:
    """Per-channel count, mean and sum of squared deviations, float64."""

    count: Tensor  # [1]
    mean: Tensor  # [C]
    m2: Tensor  # [C]

    def merged(self, other: _Moments) -> _Moments:
        """Chan et al.'s parallel merge; an empty side leaves the other as it is."""
        count = self.count + other.count
        safe = torch.where(count > 0, count, torch.ones_like(count))
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / safe)
        m2 = self.m2 + other.m2 + delta * delta * (self.count * other.count / safe)
        return _Moments(count, mean, m2)

    @staticmethod
    def zeros(channels: int, device) -> _Moments:
        zeros = torch.zeros(channels, dtype=torch.float64, device=device)
        return _Moments(zeros.new_zeros(1), zeros, zeros.clone())


def _batch_moments(input: Tensor) -> _Moments:
    channels = input.shape[1]
    count = input.numel() // channels if channels else 0
    if count == 0:
        return _Moments.zeros(channels, input.device)
    values = input if input.dtype in (torch.float32, torch.float64) else input.float()
    # Relative to one of its values per channel: a mean far from the spread (1e6 + randn in
    # float32) would leave the float32 moments nothing but rounding.
    shift = values[0].reshape(channels, -1)[:, 0]  # [C]
    shifted = values - shift.view(1, channels, *(1,) * (input.dim() - 2))
    var, mean = torch.var_mean(shifted, (0, *range(2, input.dim())), correction=0)
    count_t = torch.full((1,), float(count), dtype=torch.float64, device=input.device)
    return _Moments(count_t, shift.double() + mean.double(), var.double() * count)


class _Sites:
    """The batch-norm modules with running statistics, and their population moments so far."""

    def __init__(self, model: nn.Module):
        modules = [(n, m) for n, m in model.named_modules() if isinstance(m, _BatchNorm) and m.running_mean is not None]
        if not modules:
            raise ValueError(f"model has no batch-norm module with running statistics to recompute: {type(model).__name__}")
        self.names = [name for name, _ in modules]
        self.modules = [module for _, module in modules]
        self._index = {m.running_mean.data_ptr(): i for i, m in enumerate(self.modules)}
        self._state = {id(s) for m in self.modules for s in (m.running_mean, m.running_var, m.num_batches_tracked)}
        self.total = [self._empty(m) for m in self.modules]

    @staticmethod
    def _empty(module: _BatchNorm) -> _Moments:
        return _Moments.zeros(module.running_mean.numel(), module.running_mean.device)

    def owns(self, buffer: Tensor) -> bool:
        return id(buffer) in self._state

    def index(self, running_mean) -> int | None:
        return self._index.get(running_mean.data_ptr()) if isinstance(running_mean, Tensor) else None

    def merge(self, batch: dict[int, _Moments], group) -> None:
        """Add one batch's moments (a site it did not reach adds nothing); with a group, every
        rank's, gathered in one collective and merged in rank order."""
        local = [batch.get(i) or self._empty(m) for i, m in enumerate(self.modules)]
        if group is None:
            ranks = [local]
        else:
            flat = torch.cat([t for m in local for t in (m.count, m.mean, m.m2)])
            gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size(group))]
            dist.all_gather(gathered, flat, group=group)
            ranks = [self._unflatten(t) for t in gathered]
        for moments in ranks:
            self.total = [total.merged(m) for total, m in zip(self.total, moments)]

    def _unflatten(self, flat: Tensor) -> list[_Moments]:
        out, start = [], 0
        for module in self.modules:
            channels = module.running_mean.numel()
            count, mean, m2 = flat[start : start + 1 + 2 * channels].split([1, channels, channels])
            out.append(_Moments(count, mean, m2))
            start += 1 + 2 * channels
        return out

    def write(self, batches: int) -> None:
        for name, module, total in zip(self.names, self.modules, self.total):
            if total.count.item() < 2:
                raise ValueError(
                    f"batch-norm module {name!r} saw {int(total.count.item())} value(s) per channel over the batches: "
                    "its population statistics need 2 or more"
                )
            module.running_mean.copy_(total.mean)
            module.running_var.copy_(total.m2 / (total.count - 1))
            if module.num_batches_tracked is not None:
                module.num_batches_tracked.fill_(batches)


class _BatchStatistics(TorchDispatchMode):
    """Batch-norm ops on the sites' running statistics: record the input's moments, return
    outputs normalized with the batch's statistics, the state unchanged."""

    def __init__(self, sites: _Sites):
        super().__init__()
        self.sites = sites
        self.moments: dict[int, _Moments] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        names = _OUTPUTS.get(func)
        if names is None:
            return func(*args, **kwargs)
        a = schema_arguments(func, args, kwargs)
        site = self.sites.index(a.get("running_mean"))
        if site is None:
            return func(*args, **kwargs)
        input = a["input"]
        self.moments[site] = self.moments[site].merged(_batch_moments(input)) if site in self.moments \
            else _batch_moments(input)
        eps = a[_EPS_ARGUMENT.get(func, "eps")]
        out, save_mean, save_invstd = torch.ops.aten.native_batch_norm.default(
            input, a.get("weight"), a.get("bias"), None, None, True, 0.0, eps
        )
        # Under no_grad no backward reads the saved outputs: save_var stands in with invstd's shape.
        computed = {"out": out, "save_mean": save_mean, "save_invstd": save_invstd, "save_var": save_invstd}
        outputs = tuple(computed[name] if name in computed else _unchanged(name, a, input) for name in names)
        return outputs[0] if len(outputs) == 1 else outputs


# an op's new-state output -> the state argument it stands for
_STATE_ARGUMENTS = {
    "new_running_mean": "running_mean", "new_running_var": "running_var", "new_num_batches_tracked": "num_batches_tracked",
}


def _unchanged(name: str, arguments: dict[str, Any], input: Tensor) -> Tensor:
    """An op's output that no normalization computes: its state as it was, or an empty buffer."""
    if name == "reserve":
        return input.new_empty(0, dtype=torch.uint8)
    if name == "count":
        return input.new_empty(1, dtype=torch.float64)
    if name == "order":  # no collective here: the chain's link passes on as it came
        order = arguments.get("order")
        return input.new_zeros(1, dtype=torch.float64) if order is None else order.clone()
    state = arguments.get(_STATE_ARGUMENTS[name])
    return input.new_empty(0) if state is None else state.clone()
