import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests import composer_reference


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
