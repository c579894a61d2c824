"""bnfx.fold: eval batch norm folded into the convolution or linear layer before it, on exported
programs (both IRs) and GraphModules, checked against the unfolded program."""

import copy
import logging
import subprocess
import sys

import pytest
import torch
import torchvision
from torch import nn
from torch.fx.experimental.optimization import fuse

import bnfx
from bnfx.passes.fold import NOT_FOLDABLE_PRODUCER, OWN_FORWARD, TRAINING
from norm_act import norm_act_model


class Patterns(nn.Module):
    """Every producer bnfx folds into: grouped, 1d, 3d and transposed convolutions, with and
    without bias, linear with and without bias, and an affine=False batch norm."""

    def __init__(self):
        super().__init__()
        self.grouped = nn.Conv2d(8, 12, 3, groups=4, bias=False)
        self.bn_grouped = nn.BatchNorm2d(12)
        self.transposed = nn.ConvTranspose2d(12, 6, 2, stride=2, groups=3)
        self.bn_transposed = nn.BatchNorm2d(6, affine=False)
        self.conv1d = nn.Conv1d(6, 5, 3)
        self.bn1d = nn.BatchNorm1d(5)
        self.conv3d = nn.Conv3d(2, 3, 3, padding=1, bias=False)
        self.bn3d = nn.BatchNorm3d(3)
        self.linear = nn.Linear(13, 7)
        self.bn_linear = nn.BatchNorm1d(7)
        self.linear_no_bias = nn.Linear(7, 4, bias=False)
        self.bn_linear_no_bias = nn.BatchNorm1d(4)

    def forward(self, image, volume):
        y = self.bn_transposed(self.transposed(self.bn_grouped(self.grouped(image))))  # [N, 6, 8, 8]
        y = self.bn1d(self.conv1d(y.flatten(2)))  # [N, 5, 62]
        z = self.bn3d(self.conv3d(volume))  # [N, 3, 4, 4, 4]
        features = torch.cat([y.mean(2), z.mean((2, 3, 4)), y.amax(2)], 1)  # [N, 13]
        return self.bn_linear_no_bias(self.linear_no_bias(torch.relu(self.bn_linear(self.linear(features)))))


def patterns_inputs():
    return torch.randn(4, 8, 6, 6), torch.randn(4, 2, 4, 4, 4)


def trained_statistics(model: nn.Module) -> nn.Module:
    """``model`` in eval mode with running statistics and affine parameters far from their
    initial values, so that a fold that drops any of them shows."""
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            channels = module.num_features
            module.running_mean.copy_(torch.randn(channels, generator=generator))
            module.running_var.copy_(torch.rand(channels, generator=generator) * 2 + 0.1)
            if module.affine:
                module.weight.data.copy_(torch.rand(channels, generator=generator) + 0.5)
                module.bias.data.copy_(torch.randn(channels, generator=generator))
    return model.eval()


MODELS = {
    "resnet18": (torchvision.models.resnet18, lambda: (torch.randn(2, 3, 64, 64),)),
    "mobilenet_v3_small": (torchvision.models.mobilenet_v3_small, lambda: (torch.randn(2, 3, 64, 64),)),
    "patterns": (Patterns, patterns_inputs),
}


def site_count(program) -> int:
    return len(bnfx.find_sites(program.graph_module if hasattr(program, "graph_module") else program))


def assert_close_fp32(actual, expected):
    """Within 1e-5 of the unfolded output, relative to its largest magnitude."""
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("decomposed", [False, True], ids=["training IR", "decomposed"])
@pytest.mark.parametrize("name", MODELS)
def test_folded_program_matches_the_unfolded_one(name, decomposed):
    factory, inputs = MODELS[name]
    torch.manual_seed(0)
    model = trained_statistics(factory())
    example = inputs()
    program = torch.export.export(model, example)
    if decomposed:
        program = program.run_decompositions()
    state_before = {key: value.clone() for key, value in program.state_dict.items()}
    sites_before = site_count(program)

    report = bnfx.explain_fold(program)
    folded = bnfx.fold(program)

    assert sites_before > 0 and report.rewritten_count == sites_before == report.found
    assert f"{sites_before} batch-norm sites, {sites_before} folded" in str(report)
    assert site_count(folded) == 0
    # only the folded weights and biases remain: no batch-norm parameter or statistic
    assert not any("running" in key or "num_batches" in key for key in folded.state_dict)
    with torch.no_grad():
        assert_close_fp32(folded.module()(*example), program.module()(*example))
    # the input program is untouched
    assert site_count(program) == sites_before
    assert state_before.keys() == program.state_dict.keys()
    assert all(torch.equal(state_before[key], program.state_dict[key]) for key in state_before)


def test_folded_programs_load_in_a_fresh_process_without_bnfx(tmp_path):
    torch.manual_seed(0)
    model = trained_statistics(Patterns())
    example = patterns_inputs()
    program = torch.export.export(model, example)
    for ir, unfolded in (("training", program), ("decomposed", program.run_decompositions())):
        folded = bnfx.fold(unfolded)
        torch.export.save(folded, tmp_path / f"{ir}.pt2")
        with torch.no_grad():
            torch.save({"inputs": example, "expected": folded.module()(*example)}, tmp_path / f"{ir}.pt")
    script = (
        "import sys, torch\n"
        "for ir in ('training', 'decomposed'):\n"
        "    data = torch.load(f'{sys.argv[1]}/{ir}.pt')\n"
        "    module = torch.export.load(f'{sys.argv[1]}/{ir}.pt2').module()\n"
        "    with torch.no_grad():\n"
        "        assert torch.equal(module(*data['inputs']), data['expected']), ir\n"
        "assert 'bnfx' not in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr


class SharedOutput(nn.Module):
    """The first convolution's output feeds its batch norm and the residual sum."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.conv2 = nn.Conv2d(3, 3, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.conv(x)
        return self.bn2(self.conv2(self.bn(y) + y))


def test_a_conv_output_with_two_users_is_left_alone_with_its_reason(caplog):
    model = trained_statistics(SharedOutput())
    x = torch.randn(2, 3, 5, 5)
    program = torch.export.export(model, (x,))
    with caplog.at_level(logging.WARNING, logger="bnfx"):
        folded = bnfx.fold(program)
    records = {record.name: record for record in bnfx.explain_fold(program)}
    assert records["bn"].action == "left alone"
    assert records["bn"].reason == "conv's output has 2 users, each would read the folded output"
    assert records["bn2"].action == "folded" and records["bn2"].reason == "into conv2"
    assert site_count(folded) == 1
    assert "1 batch-norm site stays plain batch norm (conv's output has 2 users" in caplog.text
    with torch.no_grad():
        assert_close_fp32(folded.module()(x), model(x))


class SharedWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.conv(x)


def test_shared_weights_training_sites_and_other_producers_are_left_alone():
    x = torch.randn(2, 3, 5, 5)
    shared = bnfx.explain_fold(torch.export.export(trained_statistics(SharedWeight()), (x,)))
    assert [r.reason for r in shared] == ["conv's weight is shared with other layers"]

    training = torch.export.export(nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)).train(), (x,))
    assert [r.reason for r in bnfx.explain_fold(training)] == [TRAINING]
    assert site_count(bnfx.fold(training)) == 1

    first = torch.export.export(nn.Sequential(nn.BatchNorm2d(3), nn.ReLU()).eval(), (x,))
    assert [r.reason for r in bnfx.explain_fold(first)] == [NOT_FOLDABLE_PRODUCER]

    # a linear layer on [N, L, F] makes features batch norm does not normalize over
    sequence = torch.export.export(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(3)).eval(), (torch.randn(2, 3, 4),))
    assert [r.reason for r in bnfx.explain_fold(sequence)] == [
        "0 makes a 3-d output: batch norm's channels are not its features"
    ]
    assert [r.reason for r in bnfx.explain_fold(sequence.run_decompositions())] == [NOT_FOLDABLE_PRODUCER]


def test_a_linear_layer_on_sequences_is_left_alone_where_torch_fuse_folds_it_wrongly():
    """BatchNorm1d on [N, L, F] normalizes over L; torch's fuse folds it into the F features
    whenever L == F."""
    model = trained_statistics(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)))
    x = torch.randn(2, 4, 4)
    with torch.no_grad():
        expected = model(x)
        assert (fuse(model)(x) - expected).abs().max() > 0.1
        folded = bnfx.fold(model, example_inputs=(x,))
        assert site_count(folded) == 1
        torch.testing.assert_close(folded(x), expected)


def test_graph_modules_fold_into_modules_and_attributes():
    torch.manual_seed(0)
    model = trained_statistics(Patterns())
    example = patterns_inputs()
    before = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        expected = model(*example)

    folded = bnfx.fold(torch.fx.symbolic_trace(model), example_inputs=example)
    assert site_count(folded) == 0
    with torch.no_grad():
        assert_close_fp32(folded(*example), expected)
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())

    # without shapes, a linear layer's output rank is unknown; convolutions fold all the same
    report = bnfx.explain_fold(model)
    reasons = {r.name: r.reason for r in report if r.action == "left alone"}
    assert reasons == {
        "bn_linear": "linear's output rank is unknown: pass example_inputs",
        "bn_linear_no_bias": "linear_no_bias's output rank is unknown: pass example_inputs",
    }

    # functional calls on attributes: the folded bias becomes a new attribute
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(4, 3, 3, 3))
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(torch.nn.functional.conv2d(x, self.weight))

    functional = trained_statistics(Functional())
    x = torch.randn(2, 3, 6, 6)
    folded = bnfx.fold(functional)
    assert site_count(folded) == 0 and isinstance(folded.bias, nn.Parameter)
    with torch.no_grad():
        assert_close_fp32(folded(x), functional(x))


def test_folded_graph_module_pickles(tmp_path):
    model = trained_statistics(torchvision.models.resnet18())
    x = torch.randn(1, 3, 64, 64)
    folded = bnfx.fold(model)
    torch.save(folded, tmp_path / "folded.pt")
    loaded = torch.load(tmp_path / "folded.pt", weights_only=False)
    with torch.no_grad():
        assert torch.equal(loaded(x), folded(x))
        assert_close_fp32(loaded(x), model(x))


def test_norm_act_layers_fold_when_exported_and_are_left_alone_as_modules():
    model = trained_statistics(norm_act_model())
    x = torch.randn(2, 3, 8, 8)
    assert [r.reason for r in bnfx.explain_fold(model)] == [OWN_FORWARD, OWN_FORWARD]
    folded = bnfx.fold(torch.export.export(model, (x,)))
    assert site_count(folded) == 0
    with torch.no_grad():
        assert_close_fp32(folded.module()(x), model(x))


def test_bad_model_is_a_type_error():
    with pytest.raises(TypeError, match="model must be a torch.export.ExportedProgram, .* got int"):
        bnfx.fold(3)
