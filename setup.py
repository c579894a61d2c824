"""Builds the C++ CPU kernels; everything else is declared in pyproject.toml.

Each build is a shared library that registers the ops' CPU and AutogradCPU kernels with
torch's dispatcher when it is loaded (``torch.ops.load_library``, from
``bnfx.ops.device_kernels``); it has no Python module of its own.

Needs torch at build time: ``pip install --no-build-isolation -e .`` after installing torch
(the Makefile does). The extension is optional: without a C++ compiler bnfx installs and
runs on its pure-PyTorch kernels.
"""

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

# Reassociating float sums lets GCC vectorize the reductions; NaN and inf semantics stay.
FLAGS = ["-O3", "-fopenmp", "-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math", "-fno-math-errno"]


def kernels(name: str, *isa_flags: str) -> CppExtension:
    return CppExtension(
        f"bnfx.ops.{name}",
        [f"bnfx/ops/csrc/{name}.cpp" for name in ("batch_norm_cpu", "ghost_batch_norm_cpu", "sync_batch_norm_cpu")],
        extra_compile_args=FLAGS + list(isa_flags),
        extra_link_args=["-fopenmp"],
        optional=True,
    )


setup(
    # A portable build, and one for AVX2 CPUs (chosen at import, as torch picks its own kernels).
    ext_modules=[kernels("_cpu_kernels"), kernels("_cpu_kernels_avx2", "-mavx2", "-mfma")],
    cmdclass={"build_ext": BuildExtension.with_options(no_python_abi_suffix=False)},
)
