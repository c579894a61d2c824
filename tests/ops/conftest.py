import pytest
from torch.utils._python_dispatch import TorchDispatchMode

from bnfx.ops import DECOMPOSITIONS, device_kernels


@pytest.fixture(params=["fused-cpu", "views"])
def kernel(request):
    """Run a test on the C++ CPU kernels and on the ops' default bodies (PyTorch ops)."""
    if request.param == "fused-cpu":
        yield request.param
        return
    with device_kernels.default_bodies("cpu"):
        yield request.param


class Decomposed(TorchDispatchMode):
    """Runs each bnfx op that has one as its decomposition (what inductor compiles), eagerly."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return DECOMPOSITIONS.get(func, func)(*args, **(kwargs or {}))


@pytest.fixture(params=["fused-cpu", "views", "decomposition"])
def ghost_kernel(request):
    """``kernel``, and the ghost ops' decompositions too."""
    if request.param == "decomposition":
        with Decomposed():
            yield request.param
        return
    if request.param == "fused-cpu":
        yield request.param
        return
    with device_kernels.default_bodies("cpu"):
        yield request.param
