"""bnfx.recompute_statistics against float64 statistics of the concatenated batches, computed
here with each upstream batch norm normalizing per batch with its batch statistics."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnfx
import sync_workers
from gloo_world import run_world

SIZES = (5, 11, 2, 7)  # uneven batches


def two_site_model(dim: int) -> tuple[nn.Module, tuple[int, ...]]:
    """conv, BN, ReLU, conv, BN: the second site's input depends on the first's normalization."""
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dim]
    bn = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dim]
    model = nn.Sequential(conv(3, 4, 3), bn(4), nn.ReLU(), conv(4, 5, 1), bn(5))
    return model, (3,) + (6,) * dim


def reference_statistics(model: nn.Sequential, batches) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(mean, unbiased var) of each site's input over all samples, float64 throughout."""
    model = copy.deepcopy(model).double().requires_grad_(False)
    inputs_1, inputs_2 = [], []
    for x in batches:
        a = model[0](x.double())
        normalized = F.batch_norm(a, None, None, model[1].weight, model[1].bias, True, 0.0, model[1].eps)
        inputs_1.append(a)
        inputs_2.append(model[3](torch.relu(normalized)))

    def moments(xs):
        per_channel = torch.cat([x.transpose(0, 1).reshape(x.shape[1], -1) for x in xs], 1)
        return per_channel.mean(1), per_channel.var(1)

    return [moments(inputs_1), moments(inputs_2)]


def assert_statistics(model, expected, rtol=1e-6):
    for bn, (mean, var) in zip((model[1], model[4]), expected):
        scale = float(var.sqrt().max())
        torch.testing.assert_close(bn.running_mean.double(), mean, rtol=0, atol=rtol * scale)
        torch.testing.assert_close(bn.running_var.double(), var, rtol=rtol, atol=0)


@pytest.mark.parametrize("dim,channels_last", [(1, False), (2, False), (3, False), (2, True), (3, True)])
def test_exact_population_statistics(dim, channels_last):
    torch.manual_seed(0)
    model, shape = two_site_model(dim)
    model.train()  # train flags, dropout and everything but the statistics stay as they are
    batches = [torch.randn(b, *shape) * 3 + 5 for b in SIZES]
    if channels_last:
        layout = torch.channels_last if dim == 2 else torch.channels_last_3d
        model = model.to(memory_format=layout)
        batches = [x.contiguous(memory_format=layout) for x in batches]
    params = {k: v.clone() for k, v in model.named_parameters()}
    names = bnfx.recompute_statistics(model, batches)
    assert names == ["1", "4"] and model.training
    assert_statistics(model, reference_statistics(model, batches))
    for key, value in model.named_parameters():
        assert torch.equal(value, params[key]), key
        assert value.grad is None
    assert model[1].num_batches_tracked.item() == len(SIZES)  # as momentum=None's average leaves it


def test_ill_conditioned_input():
    """mean/std = 1e6 in fp32: every sample weighs the same, merged in float64."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm1d(4))
    batches = [(1e6 + torch.randn(b, 4, dtype=torch.float64)).float() for b in SIZES]
    bnfx.recompute_statistics(model, batches)
    per_channel = torch.cat(batches).double()
    torch.testing.assert_close(model[0].running_mean.double(), per_channel.mean(0), rtol=1e-7, atol=0)
    torch.testing.assert_close(model[0].running_var.double(), per_channel.var(0), rtol=1e-5, atol=0)


def test_transformed_and_compiled_models_give_the_plain_modules_statistics():
    torch.manual_seed(0)
    model, shape = two_site_model(2)
    batches = [torch.randn(b, *shape) for b in SIZES]
    plain = copy.deepcopy(model)
    bnfx.recompute_statistics(plain, batches)
    transformed_model = copy.deepcopy(model)
    bnfx.recompute_statistics(bnfx.transform(transformed_model, ghost_batch_size=4), batches)
    compiled_model = copy.deepcopy(model)
    compiled = torch.compile(compiled_model, backend="bnfx", options={"ghost_batch_size": 4, "inner": "eager"})
    compiled(batches[0])
    bnfx.recompute_statistics(compiled, batches)
    for other in (transformed_model, compiled_model):
        for key, value in plain.state_dict().items():
            if "running" in key:
                torch.testing.assert_close(other.state_dict()[key], value, rtol=0, atol=0, msg=key)


def test_torch_update_bn_weighs_batches_not_samples():
    """torch.optim.swa_utils.update_bn averages per-batch means with equal weight: on uneven
    batches its statistics are not the population's; bnfx's are."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm1d(3))
    batches = [torch.randn(b, 3) + shift for b, shift in zip(SIZES, (0.0, 4.0, -3.0, 1.0))]
    swa = copy.deepcopy(model)
    torch.optim.swa_utils.update_bn(batches, swa)
    bnfx.recompute_statistics(model, batches)
    population = torch.cat(batches).double().mean(0)
    per_batch = torch.stack([x.double().mean(0) for x in batches]).mean(0)
    torch.testing.assert_close(model[0].running_mean.double(), population, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(swa[0].running_mean.double(), per_batch, rtol=1e-6, atol=1e-6)
    assert (swa[0].running_mean.double() - population).abs().max() > 0.5


def test_batches_as_tuples_and_dicts_and_num_batches():
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm1d(3))
    data = [torch.randn(b, 3) for b in SIZES]
    as_tuples = copy.deepcopy(model)
    bnfx.recompute_statistics(as_tuples, ((x, torch.zeros(len(x))) for x in data), num_batches=2)
    as_dicts = copy.deepcopy(model)
    bnfx.recompute_statistics(as_dicts, [{"x": x} for x in data[:2]], call_model=lambda m, batch: m(batch["x"]))
    expected = torch.cat(data[:2]).double()
    for net in (as_tuples, as_dicts):
        torch.testing.assert_close(net[0].running_var.double(), expected.var(0), rtol=1e-6, atol=0)
        assert net[0].num_batches_tracked.item() == 2


def test_bad_input_raises_and_leaves_the_model_as_it_was():
    model = nn.Sequential(nn.BatchNorm1d(3))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="num_batches must be a positive int or None, got 0"):
        bnfx.recompute_statistics(model, [torch.randn(4, 3)], num_batches=0)
    with pytest.raises(ValueError, match="batches must yield at least one batch"):
        bnfx.recompute_statistics(model, [])
    with pytest.raises(TypeError, match="pass call_model="):
        bnfx.recompute_statistics(model, [{"x": torch.randn(4, 3)}])
    with pytest.raises(ValueError, match="no batch-norm module with running statistics"):
        bnfx.recompute_statistics(nn.Sequential(nn.Linear(3, 3)), [torch.randn(4, 3)])
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("sizes", [[3, 9], [6, 0, 9]], ids=["2-ranks", "3-ranks"])
def test_ranks_end_with_the_single_process_statistics(sizes):
    results = run_world(sync_workers.population_statistics, len(sizes), sizes)
    assert all(rank_state == results[0] for rank_state in results[1:])  # identical on every rank
