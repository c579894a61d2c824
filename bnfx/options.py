"""The one option vocabulary of ``bnfx.transform``, ``bnfx.backend`` and ``torch.compile``."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

import torch.distributed as dist

DEFAULT_GHOST_BATCH_SIZE = 32  # Composer's default
INNER_COMPILERS = ("inductor", "aot_eager", "eager")
# torch.compile's modes (``torch._inductor.list_mode_options``): inductor's alone
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
_GRAPH_OPTIONS = ("ghost_batch_size", "sync", "group_size", "freeze")
_BACKEND_OPTIONS = _GRAPH_OPTIONS + ("inner", "mode")
# Options for the backend where a program gives only its name (``--torchcompile bnfx``, a
# trainer's config): "ghost_batch_size=16" or "sync=true,group_size=4,inner=aot_eager".
ENVIRONMENT_VARIABLE = "BNFX_OPTIONS"


@dataclass(frozen=True)
class Options:
    """Validated options. ``mode`` is "ghost" or "sync"."""

    mode: str
    ghost_batch_size: int | None = None
    sync: Any = None  # True (WORLD), a ProcessGroup, or a group name
    group_size: int | None = None
    freeze: bool = False
    inner: str | Callable = "inductor"
    compile_mode: str | None = None  # the ``mode`` option: torch.compile's mode, for inductor

    def describe(self) -> str:
        if self.mode == "ghost":
            return f"ghost_batch_size={self.ghost_batch_size}"
        sync = self.sync.group_name if isinstance(self.sync, dist.ProcessGroup) else self.sync
        extras = (f", group_size={self.group_size}" if self.group_size else "") + (", freeze" if self.freeze else "")
        return f"sync={sync!r}{extras}"


def resolve_options(options: dict[str, Any], *, backend: bool = False) -> Options:
    """Check every option and pick the mode; raise before anything is changed.

    ``group_size`` or ``freeze`` alone mean sync mode. None of them given: sync over WORLD
    when a process group with more than one rank is initialized, otherwise ghost with 32.
    """
    allowed = _BACKEND_OPTIONS if backend else _GRAPH_OPTIONS
    for key in options:
        if key not in allowed:
            raise TypeError(f"unknown bnfx option {key!r}; allowed options: {', '.join(allowed)}")

    ghost = options.get("ghost_batch_size")
    sync = options.get("sync")
    group_size = options.get("group_size")
    freeze = options.get("freeze", False)
    inner = options.get("inner", "inductor")
    compile_mode = options.get("mode")

    if ghost is not None and (isinstance(ghost, bool) or not isinstance(ghost, int) or ghost < 1):
        raise ValueError(f"ghost_batch_size must be a positive int, got {ghost!r}")
    if sync is not None and not (isinstance(sync, (bool, str, dist.ProcessGroup)) or _not_a_member(sync)):
        raise TypeError(f"sync must be a bool, a ProcessGroup or a process group name, got {sync!r}")
    if isinstance(sync, str):
        _check_group_name(sync)
    if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1):
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if not isinstance(freeze, bool):
        raise TypeError(f"freeze must be a bool, got {freeze!r}")
    if not (callable(inner) or inner in INNER_COMPILERS):
        raise ValueError(f"inner must be one of {', '.join(INNER_COMPILERS)} or a callable, got {inner!r}")
    if compile_mode is not None and compile_mode not in COMPILE_MODES:
        raise ValueError(f"mode must be one of {', '.join(COMPILE_MODES)}, got {compile_mode!r}")
    if compile_mode not in (None, "default") and inner != "inductor":
        raise ValueError(f"mode={compile_mode!r} is inductor's; it does not apply to inner={inner!r}")
    if ghost is not None and sync not in (None, False):
        raise ValueError(
            f"ghost_batch_size and sync are exclusive, got ghost_batch_size={ghost!r} and sync={sync!r}; give one"
        )

    if ghost is not None or sync is False:
        mode = "ghost"
    elif sync is not None or group_size is not None or freeze:
        mode = "sync"
    else:
        mode = "sync" if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 else "ghost"
    if mode == "ghost":
        if group_size is not None:
            raise ValueError(f"group_size applies to sync mode only, got group_size={group_size!r} in ghost mode")
        if freeze:
            raise ValueError("freeze applies to sync mode only, got freeze=True in ghost mode")
        return Options("ghost", ghost_batch_size=ghost or DEFAULT_GHOST_BATCH_SIZE, inner=inner,
                       compile_mode=compile_mode)
    return Options("sync", sync=True if sync is None else sync, group_size=group_size, freeze=freeze, inner=inner,
                   compile_mode=compile_mode)


def _check_group_name(name: str) -> None:
    """A ``sync`` string must name a process group of this process."""
    from bnfx.torch_internals import resolve_process_group

    if dist.is_available() and dist.is_initialized():
        try:
            resolve_process_group(name)
            return
        except Exception:  # noqa: BLE001 - torch's lookup error; ours names the option
            where = "names no process group of this process"
    else:
        where = "names a process group, but no process group is initialized"
    flag = " (a flag is sync=True or sync=False, not a string)" if name.lower() in ("true", "false", "1", "0") else ""
    raise ValueError(f"sync={name!r} {where}{flag}")


def _not_a_member(sync) -> bool:
    """What ``dist.new_group`` returns on ranks outside the new group."""
    return dist.is_available() and type(sync) is int and sync == dist.GroupMember.NON_GROUP_MEMBER


def resolve_backend_options(options: dict[str, Any]) -> Options:
    """``resolve_options`` for the torch.compile backend: ``options`` over those of the
    ``BNFX_OPTIONS`` environment variable. The code's options override it key by key, and the
    mode as a whole: code that names a mode option (``ghost_batch_size``, ``sync``,
    ``group_size``, ``freeze``) takes none of the environment's."""
    from_environment = environment_options()
    if any(key in _GRAPH_OPTIONS for key in options):
        from_environment = {k: v for k, v in from_environment.items() if k not in _GRAPH_OPTIONS}
    try:
        return resolve_options({**from_environment, **options}, backend=True)
    except (TypeError, ValueError) as error:
        if not from_environment:
            raise
        raise type(error)(f"{error} ({ENVIRONMENT_VARIABLE}={os.environ[ENVIRONMENT_VARIABLE]!r})") from None


def environment_options() -> dict[str, Any]:
    """The options ``BNFX_OPTIONS`` gives, parsed but not checked: comma-separated ``key=value``
    pairs whose values are ints, ``true``/``false``, or strings (a group name, a compiler)."""
    text = os.environ.get(ENVIRONMENT_VARIABLE, "").strip()
    options = {}
    for pair in filter(None, (part.strip() for part in text.split(","))):
        key, equals, value = (part.strip() for part in pair.partition("="))
        if not equals or not key or not value:
            raise ValueError(
                f"{ENVIRONMENT_VARIABLE} must be comma-separated key=value pairs such as "
                f"'ghost_batch_size=16', got {text!r}"
            )
        options[key] = _environment_value(value)
    return options


def _environment_value(value: str):
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    try:
        return int(value)
    except ValueError:
        return value
