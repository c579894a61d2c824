import os
import sys

import pytest
import torch

from bnfx import frame_watch

sys.path.insert(0, os.path.dirname(__file__))  # tests import composer_reference


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    # as in a fresh process, where loading the "bnfx" entry point starts bnfx's frame watcher
    # (torch._dynamo.reset() clears Dynamo's compile callbacks)
    torch._dynamo.reset()
    frame_watch.watch()
    yield
    torch._dynamo.reset()
