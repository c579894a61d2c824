import contextlib

import pytest

from bnfx.ops import device_kernels
from kernel_workers import Decomposed
from world_of_one import world_of_one

_KERNELS = {
    "fused-cpu": contextlib.nullcontext,  # the C++ CPU kernels, as registered
    "views": lambda: device_kernels.default_bodies("cpu"),  # the ops' default bodies (PyTorch ops)
    "decomposition": Decomposed,  # for a shape known when compiling
    "decomposition-indexed": lambda: Decomposed(indexed=True),  # the ghost op's, for a symbolic batch size
}


@pytest.fixture(params=["fused-cpu", "views"])
def kernel(request):
    """Run a test on the C++ CPU kernels and on the ops' default bodies."""
    with _KERNELS[request.param]():
        yield request.param


@pytest.fixture(params=["fused-cpu", "views", "decomposition", "decomposition-indexed"])
def kernel_or_decomposition(request):
    """``kernel``, and the ops' inductor decompositions too (both of the ghost op's forms)."""
    with _KERNELS[request.param]():
        yield request.param


@pytest.fixture(scope="module")
def group_name():
    """The name of a gloo group of this one process, for the sync op's tests (one per module)."""
    with world_of_one() as group:
        yield group.group_name
