import subprocess
import sys


def test_demo_runs_and_prints_a_table():
    result = subprocess.run(
        [sys.executable, "-m", "bnfx.demo", "--steps", "2", "--batch", "20", "--ghost-batch-size", "8"],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert "20 batch-norm sites, 20 rewritten" in result.stdout
    assert "chunk-loop loss" in result.stdout and "step 1:" in result.stdout


def test_demo_rejects_bad_arguments():
    result = subprocess.run([sys.executable, "-m", "bnfx.demo", "--steps", "0"], capture_output=True, text=True)
    assert result.returncode == 2 and "must be positive" in result.stderr
