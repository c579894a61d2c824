"""Which kernel serves bnfx's ops is said, not guessed: ``python -m bnfx.ops`` prints it, and a
C++ extension that is missing (INFO) or fails to load (WARNING) is one log line at import."""

import re
import subprocess
import sys
import textwrap

from bnfx.ops import device_kernels


def _run(setup: str, code: str = "import bnfx") -> subprocess.CompletedProcess:
    script = textwrap.dedent(setup) + "\nimport logging; logging.basicConfig(level=logging.INFO)\n" + code
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result


def test_the_kernel_table_names_this_installs_kernels():
    result = subprocess.run([sys.executable, "-m", "bnfx.ops"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    cpu_row = next(line for line in result.stdout.splitlines() if line.startswith("cpu"))
    kernel = re.split(r"\s{2,}", cpu_row)[1]
    built = device_kernels.cpu_kernels() is not None
    assert kernel.startswith("C++ kernels (_cpu_kernels") == built and ("default bodies" in kernel) != built
    assert any(line.startswith("cuda") for line in result.stdout.splitlines())


def test_an_extension_that_fails_to_load_is_a_warning():
    result = _run("""
        import importlib.abc, importlib.machinery, sys, tempfile

        broken = tempfile.NamedTemporaryFile(suffix=".so")  # not a shared library: dlopen refuses it

        class Broken(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name.startswith("bnfx.ops._cpu_kernels"):
                    return importlib.machinery.ModuleSpec(name, None, origin=broken.name)

        sys.meta_path.insert(0, Broken())
    """, "import bnfx; from bnfx.ops.device_kernels import kernel_table; print(kernel_table()[0][1])")
    assert "WARNING:bnfx:bnfx: the C++ CPU kernels bnfx.ops._cpu_kernels" in result.stderr
    assert "were built but fail to load (" in result.stderr
    assert result.stdout.strip().startswith("the ops' PyTorch default bodies")


def test_an_extension_that_was_not_built_is_one_info_line():
    result = _run("""
        import importlib.util
        find_spec = importlib.util.find_spec
        importlib.util.find_spec = lambda name, *a: None if name.startswith("bnfx.ops._cpu_kernels") else find_spec(name, *a)
    """)
    lines = [line for line in result.stderr.splitlines() if "C++ CPU kernels" in line]
    assert len(lines) == 1 and lines[0].startswith("INFO:bnfx:bnfx: no C++ CPU kernels"), result.stderr


def test_the_cpp_side_reads_the_op_contracts_output_layout():
    import pathlib

    from bnfx.ops import batch_norm_contract as contract

    header = pathlib.Path(contract.__file__).parent / "csrc" / "op_support_cpu.h"
    [first_saved] = re.findall(r"constexpr size_t kFirstSavedOutput = (\d+);", header.read_text())
    assert int(first_saved) == contract.FIRST_SAVED == contract.output_names("ghost_batch_norm").index("save_mean")
    assert contract.output_names("sync_batch_norm")[contract.FIRST_SAVED] == "save_mean"
