"""The ``bnfx`` console script, run as a user runs it: every subcommand, and bad arguments."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision

import bnfx  # noqa: F401  (registers torch.ops.bnfx for loading exported programs)
import cli_models

BNFX = str(Path(sys.executable).parent / "bnfx")
TESTS = os.path.dirname(__file__)


def run(*args, timeout=600, cwd=None):
    env = dict(os.environ, PYTHONPATH=TESTS)  # for package.module:factory models
    return subprocess.run([BNFX, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)


def summary_value(stdout: str, label: str) -> str:
    line = next(line for line in stdout.splitlines() if line.startswith(label))
    return line[len(label):].strip()


@pytest.mark.parametrize("command", [[], ["demo"], ["inspect"], ["export"]])
def test_help(command):
    result = run(*command, "--help")
    assert result.returncode == 0 and result.stdout.startswith("usage: bnfx"), result.stderr


def test_demo_ghost_against_composer():
    result = run("demo", "--steps", "2", "--batch", "20", "--ghost-batch-size", "8")
    assert result.returncode == 0, result.stderr
    assert "20 batch-norm sites, 20 rewritten" in result.stdout and "step 1:" in result.stdout
    assert summary_value(result.stdout, "batch-norm sites rewritten") == "20 of 20"
    assert float(summary_value(result.stdout, "max |out diff|")) < 1e-3


def test_demo_compares_like_with_like_with_dropout():
    # mobilenet_v3_small has dropout: two runs would draw different masks
    result = run("demo", "--model", "mobilenet_v3_small", "--steps", "1", "--batch", "8", "--image-size", "32")
    assert result.returncode == 0, result.stderr
    assert "(1 dropout layer off in both runs" in result.stdout
    assert float(summary_value(result.stdout, "max |out diff|")) < 1e-4


def test_demo_sync_on_two_processes():
    result = run("demo", "--sync", "--nproc", "2", "--steps", "2", "--batch", "6")
    assert result.returncode == 0, result.stderr
    assert "plain batch norm on all 12 samples" in result.stdout
    assert summary_value(result.stdout, "batch-norm sites rewritten") == "20 of 20"
    assert float(summary_value(result.stdout, "max |out diff|")) < 1e-3


def test_inspect_model_name_and_factory():
    result = run("inspect", "resnet18", "--ghost-batch-size", "16")
    assert result.returncode == 0, result.stderr
    assert "layer4.1.bn2" in result.stdout and "20 batch-norm sites, 20 rewritten" in result.stdout
    result = run("inspect", "graph_counts:ThreeForms", "--sync")
    assert result.returncode == 0, result.stderr
    assert "no initialized process group: plain batch norm" in result.stdout


def test_export_then_load_and_run(tmp_path):
    program = tmp_path / "resnet18.pt2"
    result = run("export", "resnet18", "-o", str(program), "--ghost-batch-size", "8", "--input-shape", "16,3,32,32")
    assert result.returncode == 0, result.stderr
    assert "20 batch-norm sites, 20 rewritten" in result.stdout
    module = torch.export.load(program).module()
    torch.manual_seed(0)
    x = torch.randn(16, 3, 32, 32)
    reference = torchvision.models.resnet18()
    reference.load_state_dict(module.state_dict())
    expected = bnfx.transform(reference, ghost_batch_size=8)(x)
    torch.testing.assert_close(module(x), expected, rtol=1e-4, atol=1e-5)
    # the saved program's sites are bnfx's now: inspect lists them, and would rewrite none again
    inspected = run("inspect", str(program), "--ghost-batch-size", "4")
    assert inspected.returncode == 0, inspected.stderr
    assert "layer4.1.bn2" in inspected.stdout and "bnfx.ghost_batch_norm" in inspected.stdout
    assert "made by bnfx.convert or a rewrite before: ghost_batch_size=8" in inspected.stdout
    assert "20 batch-norm sites, 20 rewritten" in inspected.stdout


def test_export_folded_then_load_without_bnfx(tmp_path):
    program = tmp_path / "folded.pt2"
    result = run("export", "cli_models:seeded_convnet", "-o", str(program), "--eval", "--fold",
                 "--input-shape", "2,3,9,9", "--decomposed")
    assert result.returncode == 0, result.stderr
    assert "2 batch-norm sites, 2 folded" in result.stdout and "reads it without bnfx" in result.stdout
    loaded = torch.export.load(program)
    assert not bnfx.find_sites(loaded.graph_module)
    x = torch.randn(2, 3, 9, 9)
    expected = cli_models.seeded_convnet().eval()(x)
    torch.testing.assert_close(loaded.module()(x), expected, rtol=1e-5, atol=1e-5)
    inspected = run("inspect", str(program), "--fold")
    assert inspected.returncode == 0 and "0 batch-norm sites, 0 folded" in inspected.stdout


def test_inspect_exported_program(tmp_path):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    program = tmp_path / "plain.pt2"
    torch.export.save(torch.export.export(model, (torch.randn(8, 3, 6, 6),)), program)
    result = run("inspect", str(program), "--ghost-batch-size", "4")
    assert result.returncode == 0, result.stderr
    assert "aten.batch_norm" in result.stdout and "1 batch-norm sites, 1 rewritten" in result.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "a command is required"),
        (["demo", "--steps", "0"], "--steps: expected a positive int, got '0'"),
        (["demo", "--inner", "tvm"], "invalid choice: 'tvm'"),
        (["inspect", "no_such_model"], "unknown model 'no_such_model'"),
        (["inspect", "no_such_module:factory"], "cannot load model 'no_such_module:factory'"),
        (["inspect", "missing.pt2"], "no such file: 'missing.pt2'"),
        (["inspect", "resnet18", "--ghost-batch-size", "8", "--sync"], "exclusive"),
        (["export", "resnet18"], "the following arguments are required: -o/--output"),
        (["export", "resnet18", "-o", "x.pt2", "--input-shape", "8,x"], "expected sizes like 32,3,224,224"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["export", "resnet18", "-o", "x.pt2", "--input-shape", "2,4,32,32"],
         "--input-shape 2,4,32,32 does not fit resnet18: Given groups=1, weight of size [64, 3, 7, 7]"),
        (["export", "resnet18", "-o", "x.pt2", "--input-shape", "1,3,32,32"],
         "a training-mode export needs a batch of 2 samples or more"),
        (["export", "resnet18", "-o", "no_such_folder/x.pt2"], "no such folder"),
        (["export", "resnet18", "-o", "r18.txt"], "-o r18.txt: export writes a torch.export program; give a .pt2 file"),
        (["export", "resnet18", "-o", "x.pt2", "--input-shape", "8,3,32"],
         "--input-shape 8,3,32: resnet18 needs 4 dimensions (N,C,H,W), got 3"),
        (["export", "resnet18", "-o", "x.pt2", "--fold"], "--fold needs --eval"),
        (["inspect", "resnet18", "--eval", "--fold", "--ghost-batch-size", "8"],
         "--fold folds eval batch norm; --ghost-batch-size 8 does not apply to it"),
        (["inspect", "cli_models:untraceable"], 'cannot trace DataDependent'),
        (["inspect", "cli_models:not_a_model"], "cli_models:not_a_model must return an nn.Module, got int"),
        (["inspect", "cli_models:broken"], "cannot load model 'cli_models:broken': no weights here"),
    ],
)
def test_bad_arguments_print_one_line_and_exit_2(args, message):
    result = run(*args, timeout=120)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_the_untraceable_model_is_told_to_use_torch_compile():
    result = run("inspect", "cli_models:untraceable", timeout=120)
    assert 'torch.compile(model, backend="bnfx"' in result.stderr, result.stderr


def test_a_factory_in_the_current_directory(tmp_path):
    (tmp_path / "mymodels.py").write_text(
        "import torch\n"
        "def make():\n"
        "    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))\n"
    )
    result = run("inspect", "mymodels:make", "--ghost-batch-size", "4", timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "1 batch-norm sites, 1 rewritten" in result.stdout


def test_demo_help_says_what_model_accepts():
    result = run("demo", "--help", timeout=120)
    assert "torchvision" in result.stdout and "package.module:factory" in result.stdout
