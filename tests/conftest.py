import os
import sys

import torch

# Without a GPU, the Triton kernels run in Triton's interpreter on CPU tensors; Triton reads
# this when its kernels are defined, so before anything imports bnfx.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from bnfx import frame_watch  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))  # tests import composer_reference


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    # as in a process where torch.compile has looked the "bnfx" backend up: loading its entry
    # point starts bnfx's frame watcher, which torch._dynamo.reset() keeps
    torch._dynamo.reset()
    frame_watch.watch()
    yield
    torch._dynamo.reset()
