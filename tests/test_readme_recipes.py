"""The README's recipes, run as written: each code block after a ``<!-- recipe: NAME -->``
line is saved as a script and run the way its first comment says."""

import os
import pathlib
import re
import subprocess
import sys

import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def recipe(name: str) -> str:
    match = re.search(rf"<!-- recipe: {name} -->\n```python\n(.*?)```", README.read_text(), re.S)
    assert match, f"README has no recipe {name!r}"
    return match.group(1)


def test_torchrun_script_with_a_timm_norm_act_model_converted_to_sync(tmp_path):
    pytest.importorskip("timm")
    script = tmp_path / "train_sync.py"
    script.write_text(recipe("torchrun-convert"))
    assert script.read_text().startswith("# torchrun --nproc_per_node=2 train_sync.py")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    checksums = dict(re.findall(r"rank (\d): running statistics checksum (\d\.\d+e[+-]\d+)", result.stdout))
    assert set(checksums) == {"0", "1"}, result.stdout
    assert checksums["0"] == checksums["1"]  # the group's statistics, on both ranks


def test_backend_name_with_options_from_the_environment(tmp_path):
    pytest.importorskip("timm")
    script = tmp_path / "compile_by_name.py"
    script.write_text(recipe("backend-name-only"))
    first_line = script.read_text().splitlines()[0]
    assert first_line == '# BNFX_OPTIONS="ghost_batch_size=16,inner=aot_eager" python compile_by_name.py'
    environment = {**os.environ, "BNFX_OPTIONS": "ghost_batch_size=16,inner=aot_eager"}
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600,
                            cwd=tmp_path, env=environment)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "BatchNormAct2d: num_batches_tracked 2"  # 32 samples, ghost batches of 16
