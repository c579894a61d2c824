"""What Dynamo captures for a backend that is not bnfx, printed as JSON: run in a fresh process
with ``plain`` (bnfx never imported) or ``after-bnfx`` (bnfx imported, and other instances of
the same models compiled for it first, so that its compile-start callback is live)."""

import json
import os
import sys
import tempfile

import torch
import torch.distributed as dist
import torchvision
from torch import nn
from torch._dynamo.utils import counters

from norm_act import norm_act_model


def models() -> dict[str, tuple[nn.Module, int]]:
    """Models whose batch norms bnfx gives traceable forwards in its own compiles, with their
    input size."""
    torch.manual_seed(0)
    return {
        "resnet18 SyncBatchNorm": (
            nn.SyncBatchNorm.convert_sync_batchnorm(torchvision.models.resnet18(num_classes=4)), 32,
        ),
        "NormAct": (norm_act_model(), 8),
        "momentum=None": (nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=None), nn.ReLU()), 8),
    }


def train_step(compiled, size: int) -> str:
    x = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(0))
    try:
        out = compiled(x)
        out.backward(torch.ones_like(out))
    except Exception as error:  # noqa: BLE001 - the failure is part of what is compared
        return f"{type(error).__name__}: {str(error).splitlines()[0]}"
    return "ran"


def record(model: nn.Module, size: int) -> dict:
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(gm.code)
        return gm.forward

    breaks = sum(counters["graph_break"].values())
    outcome = train_step(torch.compile(model, backend=recording_backend), size)
    return {"graphs": graphs, "outcome": outcome, "graph breaks": sum(counters["graph_break"].values()) - breaks}


def main(mode: str) -> None:
    # A world of one: nn.SyncBatchNorm takes its synchronized path, as under a launcher.
    store = os.path.join(tempfile.mkdtemp(), "store")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    if mode == "after-bnfx":
        import bnfx  # noqa: F401  (registers the "bnfx" backend)

        for model, size in models().values():
            assert train_step(torch.compile(model, backend="bnfx", options={"sync": True, "inner": "eager"}), size) == "ran"
    print(json.dumps({name: record(model, size) for name, (model, size) in models().items()}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
