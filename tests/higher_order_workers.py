"""Rank functions for the second-derivative and forward-mode tests of sync batch norm (run by
``gloo_world.run_world``): each rank checks its share against one process on the
concatenated batch, float64."""

from __future__ import annotations

import torch
import torch.autograd.forward_ad as forward_ad
import torch.distributed as dist

import bnfx

CHANNELS = 3


def _data(sizes):
    generator = torch.Generator().manual_seed(0)
    batch = sum(sizes)
    make = lambda *shape: torch.randn(*shape, dtype=torch.float64, generator=generator)  # noqa: E731
    return make(batch, CHANNELS, 4) * 2 + 1, make(batch, CHANNELS, 4), make(batch, CHANNELS, 4), make(CHANNELS)


def _rank_slice(sizes, rank):
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def second_derivatives(rank: int, world_size: int, sizes) -> None:
    """A gradient penalty through sync batch norm, ``(d out / d x . u)^2`` summed over every
    rank, then its gradient: each rank's input gradient and the summed weight gradients equal
    one process's on the concatenation."""
    x_all, upstream, _, weight_init = _data(sizes)
    share = _rank_slice(sizes, rank)

    def penalty_grads(x, u, module):
        x = x.clone().requires_grad_()
        out = module(x)
        [grad_x] = torch.autograd.grad(out, x, u, create_graph=True)
        (grad_x * grad_x).sum().backward()
        return grad_x.detach(), x.grad, module.weight.grad

    reference = torch.nn.BatchNorm1d(CHANNELS).double()
    reference.weight.data.copy_(weight_init)
    want_first, want_x, want_w = penalty_grads(x_all, upstream, reference)

    model = bnfx.convert(torch.nn.BatchNorm1d(CHANNELS).double(), sync=True)
    model.weight.data.copy_(weight_init)
    got_first, got_x, got_w = penalty_grads(x_all[share], upstream[share], model)
    dist.all_reduce(got_w)  # each rank's share of the weight gradient, summed as data parallelism does
    torch.testing.assert_close(got_first, want_first[share])
    torch.testing.assert_close(got_x, want_x[share])
    torch.testing.assert_close(got_w, want_w)
    torch.testing.assert_close(model.running_mean, reference.running_mean)


def tangents(rank: int, world_size: int, sizes) -> None:
    """Forward-mode AD through sync batch norm in training and eval: each rank's output tangent
    equals one process's on the concatenation (input, weight and bias tangents)."""
    x_all, _, tangent_all, weight_init = _data(sizes)
    share = _rank_slice(sizes, rank)
    for training in (True, False):
        reference = torch.nn.BatchNorm1d(CHANNELS).double().train(training)
        model = bnfx.convert(torch.nn.BatchNorm1d(CHANNELS).double().train(training), sync=True)
        results = []
        for module, x, t in ((reference, x_all, tangent_all), (model, x_all[share], tangent_all[share])):
            with forward_ad.dual_level():
                weight = forward_ad.make_dual(weight_init, torch.ones(CHANNELS, dtype=torch.float64))
                bias = forward_ad.make_dual(torch.zeros(CHANNELS, dtype=torch.float64), weight_init)
                out = torch.func.functional_call(module, {"weight": weight, "bias": bias}, (forward_ad.make_dual(x, t),))
                results.append(forward_ad.unpack_dual(out).tangent)
        torch.testing.assert_close(results[1], results[0][share])
