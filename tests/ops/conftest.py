import pytest

from bnfx.ops import device_kernels


@pytest.fixture(params=["fused-cpu", "views"])
def kernel(request):
    """Run a test on the C++ CPU kernels and on the ops' default bodies (PyTorch ops)."""
    if request.param == "fused-cpu":
        yield request.param
        return
    with device_kernels.default_bodies("cpu"):
        yield request.param
