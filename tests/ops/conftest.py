import contextlib

import pytest

from bnfx.ops import device_kernels
from kernel_workers import Decomposed

_KERNELS = {
    "fused-cpu": contextlib.nullcontext,  # the C++ CPU kernels, as registered
    "views": lambda: device_kernels.default_bodies("cpu"),  # the ops' default bodies (PyTorch ops)
    "decomposition": Decomposed,
}


@pytest.fixture(params=["fused-cpu", "views"])
def kernel(request):
    """Run a test on the C++ CPU kernels and on the ops' default bodies."""
    with _KERNELS[request.param]():
        yield request.param


@pytest.fixture(params=["fused-cpu", "views", "decomposition"])
def kernel_or_decomposition(request):
    """``kernel``, and the ops' inductor decompositions too."""
    with _KERNELS[request.param]():
        yield request.param
