"""What each process of the compile-cache tests runs: one compiled training step of a small
float64 model in a fresh process on a shared ``TORCHINDUCTOR_CACHE_DIR``, checked against the
eager converted model (bnfx's kernels, not the decompositions inductor compiles), with torch's
cache counters returned. Run as ``python compile_cache_workers.py SPEC`` (one process) or
through ``gloo_world.run_world(ranks, ...)`` (sync)."""

from __future__ import annotations

import copy
import json
import os
import sys

import torch
from torch import nn

# A decomposition changed by a bnfx release: its output moved by this much.
SHIFT = 0.5


def model() -> nn.Module:
    """A batch norm last: a decomposition's shifted output is the model's."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3), nn.BatchNorm1d(3)).double()


def _change(change: str | None, sync: bool) -> None:
    import bnfx

    if change == "version":
        bnfx.__version__ += "+changed"
    elif change == "decomposition":
        op = torch.ops.bnfx.sync_batch_norm.default if sync else torch.ops.bnfx.ghost_batch_norm.default
        original = bnfx.ops.DECOMPOSITIONS[op]

        def shifted(*args, **kwargs):
            out = original(*args, **kwargs)
            return (out[0] + SHIFT, *out[1:])

        bnfx.ops.DECOMPOSITIONS[op] = shifted
    elif change is not None:
        raise ValueError(change)


def compiled_step(rank: int, world_size: int, spec: dict, cache_dir: str) -> dict:
    """One step through ``spec``'s door and options; its numbers checked; the cache counters."""
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache_dir
    import bnfx
    from torch._dynamo.utils import counters

    options, mode = spec["options"], spec.get("mode")
    sync = "ghost_batch_size" not in options
    _change(spec.get("change"), sync)
    net = model()
    reference = bnfx.convert(copy.deepcopy(net), **options)
    if spec["door"] == "backend":
        compiled = torch.compile(net, backend="bnfx", options={**options, **({"mode": mode} if mode else {})})
    else:
        compiled = torch.compile(bnfx.convert(net, **options), mode=mode)
    generator = torch.Generator().manual_seed(rank)
    x = torch.randn(8, 6, dtype=torch.float64, generator=generator)
    dy = torch.randn(8, 3, dtype=torch.float64, generator=generator)
    x_ref = x.clone().requires_grad_()
    x.requires_grad_()
    out, out_ref = compiled(x), reference(x_ref)
    out.backward(dy)
    out_ref.backward(dy)
    shift = SHIFT if spec.get("change") == "decomposition" else 0.0
    at = f"{spec} on rank {rank}"
    torch.testing.assert_close(out, out_ref + shift, msg=lambda m: f"{at}: output\n{m}")
    torch.testing.assert_close(x.grad, x_ref.grad, msg=lambda m: f"{at}: input grad\n{m}")
    expected = dict(reference.named_buffers())
    for key, value in net.named_buffers():
        torch.testing.assert_close(value, expected[key], msg=lambda m: f"{at}: {key}\n{m}")
    return {key: counters["aot_autograd"][key] for key in ("autograd_cache_hit", "autograd_cache_miss",
                                                          "autograd_cache_bypass")}


if __name__ == "__main__":
    spec, cache_dir = json.loads(sys.argv[1]), sys.argv[2]
    print(json.dumps(compiled_step(0, 1, spec, cache_dir)))
