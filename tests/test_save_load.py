"""A transformed GraphModule is a checkpoint like any other: torch.save/torch.load and pickle
round-trip it, in this process and in a fresh one that imports bnfx, and the loaded module
calls bnfx's run-time functions as the saved one did."""

import copy
import io
import os
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import fx, nn

import bnfx
from bnfx.functional import RUNTIME_FUNCTIONS
from checkpointed import CheckpointedBlocks
from norm_act import norm_act_model
from world_of_one import world_of_one


def plain_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(144, 3),
                         nn.BatchNorm1d(3))


MODELS = {
    "plain": plain_model,
    "norm-act": norm_act_model,  # subclasses with their own forward: the own-forward functions
    # symbolic_trace through the subclasses' forwards: sites on their own statistics
    "traced-norm-act": lambda: fx.symbolic_trace(norm_act_model()),
    "checkpointed": CheckpointedBlocks,  # regions that bnfx.trace keeps checkpointed
}
OPTIONS = {"ghost": {"ghost_batch_size": 4}, "sync": {"sync": True}, "frozen": {"sync": True, "freeze": True}}


def _runtime_calls(gm: fx.GraphModule) -> list[str]:
    return sorted(n.target.__name__ for n in gm.graph.nodes if n.op == "call_function" and n.target in RUNTIME_FUNCTIONS)


def _calls(gm: fx.GraphModule) -> list:
    return [(n.op, n.target) for n in gm.graph.nodes if n.op.startswith("call_")]


@pytest.mark.parametrize("options", list(OPTIONS))
@pytest.mark.parametrize("model", list(MODELS))
def test_torch_save_and_load_round_trip(model, options):
    with world_of_one():
        gm = bnfx.transform(MODELS[model](), **OPTIONS[options])
    x = torch.randn(8, 3, 8, 8)
    buffer = io.BytesIO()
    torch.save(gm, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert _runtime_calls(loaded) == _runtime_calls(gm)
    assert _calls(loaded) == _calls(gm)
    # the same computation on the same state: outputs and the updated state agree
    twin = copy.deepcopy(gm)
    torch.testing.assert_close(loaded(x), twin(x), rtol=0, atol=0)
    for (key, value), expected in zip(loaded.state_dict().items(), twin.state_dict().values()):
        torch.testing.assert_close(value, expected, rtol=0, atol=0, msg=key)
    assert _calls(pickle.loads(pickle.dumps(gm))) == _calls(gm)


def test_a_fresh_process_loads_it(tmp_path):
    gm = bnfx.transform(norm_act_model(), ghost_batch_size=4)
    path = tmp_path / "model.pt"
    torch.save(gm, path)
    x = torch.randn(8, 3, 8, 8)
    torch.save(x, tmp_path / "x.pt")
    expected = copy.deepcopy(gm)(x)
    script = textwrap.dedent(f"""
        import torch, bnfx
        gm = torch.load({str(path)!r}, weights_only=False)
        torch.save(gm(torch.load({str(tmp_path / 'x.pt')!r})), {str(tmp_path / 'out.pt')!r})
    """)
    # the model's classes import from the tests' folder
    env = {**os.environ, "PYTHONPATH": os.path.dirname(__file__)}
    subprocess.run([sys.executable, "-c", script], check=True, timeout=300, env=env)
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), expected, rtol=0, atol=0)
