"""A batch-norm call's arguments by name, whichever way it was called: positionally or by
keyword, through ``F.batch_norm``, ``torch.batch_norm`` or an op with a schema. The one reader
of the matcher, the NormAct redirect and the population statistics."""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F

from bnfx import torch_internals

_FUNCTIONAL_SIGNATURE = inspect.signature(F.batch_norm)
# torch.batch_norm is aten's batch_norm: its keywords are the schema's
_TORCH_BATCH_NORM = torch.ops.aten.batch_norm.default


def functional_arguments(function, args: tuple, kwargs: dict) -> dict[str, Any]:
    """A call of ``F.batch_norm`` or ``torch.batch_norm``: its arguments by name (``input``,
    ``weight``, ``bias``, ``running_mean``, ``running_var``, ``training``, ``momentum``,
    ``eps``), defaults filled in."""
    if function is torch.batch_norm:
        return schema_arguments(_TORCH_BATCH_NORM, args, kwargs)
    bound = _FUNCTIONAL_SIGNATURE.bind(*args, **kwargs)
    bound.apply_defaults()
    return bound.arguments


def schema_arguments(op, args: tuple, kwargs: dict) -> dict[str, Any]:
    """A call's arguments by their names in ``op``'s schema, defaults filled in."""
    arguments = {}
    for position, argument in enumerate(torch_internals.op_arguments(op)):
        if position < len(args):
            arguments[argument.name] = args[position]
        elif argument.name in kwargs:
            arguments[argument.name] = kwargs[argument.name]
        elif argument.has_default_value():
            arguments[argument.name] = argument.default_value
    return arguments
