"""Models by name for the ``bnfx`` command and its demo: a torchvision model, or the user's
``package.module:factory``."""

from __future__ import annotations

import importlib
import os
import sys

import torch

from bnfx.messages import first_line


class UsageError(Exception):
    """A bad command-line argument: one line on stderr, exit code 2."""


def load_model(spec: str, **torchvision_kwargs) -> torch.nn.Module:
    """A torchvision model by name (built with ``torchvision_kwargs``), or ``package.module:factory()``."""
    if ":" in spec:
        module_name, _, factory = spec.partition(":")
        if "" not in sys.path and os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())  # as `python -m` does: the user's own modules
        try:
            model = getattr(importlib.import_module(module_name), factory)()
        except Exception as error:  # noqa: BLE001 - the user's module or factory failed: one line
            raise UsageError(f"bnfx: cannot load model {spec!r}: {first_line(error)}") from None
        if not isinstance(model, torch.nn.Module):
            raise UsageError(f"bnfx: {spec} must return an nn.Module, got {type(model).__name__}")
        return model
    import torchvision

    try:
        return torchvision.models.get_model(spec, **torchvision_kwargs)
    except ValueError:
        raise UsageError(
            f"bnfx: unknown model {spec!r}: give a torchvision model name (e.g. resnet18) or package.module:factory"
        ) from None
