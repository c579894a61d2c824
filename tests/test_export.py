"""torch.export programs: rewritten in both IRs, saved, loaded in a fresh process and run."""

import copy
import subprocess
import sys
import textwrap

import pytest
import torch
import torchvision

import bnfx
import sync_workers
from gloo_world import run_world
from graph_counts import count

GHOST_OP = torch.ops.bnfx.ghost_batch_norm.default

# Runs in a fresh interpreter: bnfx must be imported before torch.export.load.
LOAD_AND_RUN = textwrap.dedent(
    """
    import sys
    import torch
    import bnfx  # registers torch.ops.bnfx.* for the deserializer

    program, data = sys.argv[1], sys.argv[2]
    module = torch.export.load(program).module()
    for step in torch.load(data)["steps"]:  # the same steps, from the same state
        out = module(step["x"])
        torch.testing.assert_close(out, step["out"], rtol=1e-4, atol=1e-5)
        state = module.state_dict()
        for key, value in step["state"].items():
            torch.testing.assert_close(state[key], value, rtol=1e-4, atol=1e-5, msg=key)
    print("ok")
    """
)


def exported(model, x, decomposed):
    ep = torch.export.export(model, (x,))
    return ep.run_decompositions() if decomposed else ep


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("decomposed", [False, True], ids=["training-IR", "decomposed-IR"])
def test_resnet18_round_trip_in_a_fresh_process(tmp_path, decomposed, training):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).train(training)
    x = torch.randn(24, 3, 32, 32)
    ep = exported(copy.deepcopy(model), x, decomposed)
    rewritten = bnfx.transform(ep, ghost_batch_size=16)
    assert count(rewritten.graph_module, GHOST_OP) == (20 if training else 0)
    assert count(ep.graph_module, GHOST_OP) == 0  # the input program is untouched

    # the reference: the eager rewrite of the same model, one call, then its state
    reference = copy.deepcopy(model)
    out = bnfx.transform(reference, ghost_batch_size=16)(x)
    state = {k: v for k, v in reference.state_dict().items() if "running" in k or "num_batches" in k}

    # saved before it runs (running it updates the program's buffers): a fresh process must
    # take the same step from the same state
    program = tmp_path / "model.pt2"
    torch.export.save(rewritten, program)
    torch.save({"steps": [{"x": x, "out": out, "state": state}]}, tmp_path / "expected.pt")

    module = rewritten.module()
    torch.testing.assert_close(module(x), out, rtol=1e-4, atol=1e-5)
    for key, value in state.items():
        torch.testing.assert_close(module.state_dict()[key], value, rtol=1e-4, atol=1e-5, msg=key)
    result = subprocess.run(
        [sys.executable, "-c", LOAD_AND_RUN, str(program), str(tmp_path / "expected.pt")],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


def test_explain_lists_every_site_of_both_irs():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    x = torch.randn(8, 3, 6, 6)
    for decomposed in (False, True):
        for training in (True, False):
            ep = exported(copy.deepcopy(model).train(training), x, decomposed)
            [record] = bnfx.explain(ep, ghost_batch_size=4).records
            assert record.name == "1"
            assert record.action == ("ghost" if training else "left alone"), record


def variants_model():
    # track_running_stats=False decomposes to aten._native_batch_norm_legit.no_stats
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3),
        torch.nn.BatchNorm2d(4, track_running_stats=False),
        torch.nn.BatchNorm2d(4, affine=False),
        torch.nn.BatchNorm2d(4, momentum=0.3),
    )


@pytest.mark.parametrize("decomposed", [False, True], ids=["training-IR", "decomposed-IR"])
def test_every_module_variant_is_a_site_of_both_irs(decomposed):
    torch.manual_seed(0)
    model = variants_model()
    x = torch.randn(10, 3, 6, 6)
    for training in (True, False):
        ep = exported(copy.deepcopy(model).train(training), x, decomposed)
        records = bnfx.explain(ep, ghost_batch_size=4).records
        assert [r.name for r in records] == ["1", "2", "3"], records
        # eval mode with track_running_stats=False uses batch statistics: rewritten too
        expected = ["ghost"] * 3 if training else ["ghost", "left alone", "left alone"]
        assert [r.action for r in records] == expected, records

    # trained through the rewritten program: the eager rewrite of the module as reference
    ep = exported(copy.deepcopy(model), x, decomposed)
    module = bnfx.transform(ep, ghost_batch_size=4).module()
    reference = copy.deepcopy(model)
    eager = bnfx.transform(reference, ghost_batch_size=4)
    for _ in range(2):
        torch.testing.assert_close(module(x), eager(x), rtol=1e-4, atol=1e-5)
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(module.state_dict()[key], value, rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.parametrize("decomposed", [False, True], ids=["training-IR", "decomposed-IR"])
def test_sync_program_on_two_gloo_processes(decomposed):
    run_world(sync_workers.exported_sync, 2, decomposed)


@pytest.mark.parametrize("decomposed", [False, True], ids=["training-IR", "decomposed-IR"])
def test_freeze_on_exported_programs_equals_the_module_level_freeze(tmp_path, decomposed):
    torch.manual_seed(0)
    model = variants_model()
    with torch.no_grad():
        for bn in list(model)[1:]:
            if bn.running_mean is not None:
                bn.running_mean.uniform_(-1, 1)
                bn.running_var.uniform_(0.5, 2)
    x = torch.randn(10, 3, 6, 6)
    for training in (True, False):
        ep = exported(copy.deepcopy(model).train(training), x, decomposed)
        records = bnfx.explain(ep, freeze=True).records
        # track_running_stats=False has no running statistics to freeze with: sync mode's
        # reason (no process group here) keeps it plain
        assert [r.action for r in records] == ["left alone", "frozen", "frozen"], records
        rewritten = bnfx.transform(ep, freeze=True)
        path = tmp_path / f"frozen_{training}.pt2"
        torch.export.save(rewritten, path)
        module = torch.export.load(path).module()
        before = copy.deepcopy(module.state_dict())

        reference = copy.deepcopy(model).train(training)
        expected = bnfx.transform(reference, freeze=True)(x)
        out = module(x)
        torch.testing.assert_close(out, expected)
        for key, value in module.state_dict().items():
            torch.testing.assert_close(value, before[key], rtol=0, atol=0, msg=key)  # nothing updates
        out.backward(torch.randn_like(out))
        params = dict(module.named_parameters())
        for name in ("2.weight", "2.bias", "3.weight", "3.bias"):  # affine=False has none at 2
            if name in params:
                assert params[name].grad is None, name
        assert params["0.weight"].grad is not None  # the rest of the model still trains
