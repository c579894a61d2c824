"""The private torch APIs bnfx relies on where no public one does the job, in one place.

Each is checked once (at import, or for Dynamo's at the backend's first use, since importing
Dynamo costs a second): when a torch release has changed one, bnfx says at WARNING what no
longer works and which door still does, and never falls back silently. The torch versions
bnfx is tested with are declared here and in pyproject.toml (a test compares them); ``import
bnfx`` under another version warns once.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import inspect
import logging
import re
import sys
import warnings
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.export

log = logging.getLogger("bnfx")

# [lowest, first unsupported) (major, minor): pyproject.toml's "torch>=2.14,<2.15"
SUPPORTED_TORCH = ((2, 14), (2, 15))


def check_torch_version(version: str) -> bool:
    """Whether bnfx is tested with torch ``version``; WARNING once where it is not."""
    match = re.match(r"(\d+)\.(\d+)", str(version))
    low, high = SUPPORTED_TORCH
    if match and low <= (int(match[1]), int(match[2])) < high:
        return True
    log.warning(
        "bnfx: torch %s is outside the versions bnfx is tested with (>=%d.%d,<%d.%d); the private torch APIs "
        "bnfx uses are checked, and a WARNING names what no longer works",
        version, *low, *high,
    )
    return False


def _missing(what: str, consequence: str) -> None:
    log.warning("bnfx: this torch (%s) has no %s: %s", torch.__version__, what, consequence)


# -- autograd: is a backward running? (torch's own ModuleTracker.is_bw reads the same)

_graph_task_id: Callable[[], int] | None = getattr(torch._C, "_current_graph_task_id", None)
if _graph_task_id is None:
    _missing(
        "torch._C._current_graph_task_id",
        "a bnfx.convert model under eager activation checkpointing updates its running statistics twice a step, "
        "as torch's batch norm does; bnfx.transform (which keeps checkpointed regions) and torch.compile update "
        "them once",
    )


def in_backward() -> bool | None:
    """Whether autograd's engine is running a backward on this thread (None: unknown)."""
    return None if _graph_task_id is None else _graph_task_id() != -1


# -- torch.func: is a transform (jvp, grad, vmap) running?

_transforms_active: Callable[[], bool] | None = getattr(torch._C, "_are_functorch_transforms_active", None)
if _transforms_active is None:
    _missing(
        "torch._C._are_functorch_transforms_active",
        "torch.func transforms (jvp, grad, vmap) through a bnfx.convert model reach the ops' C++ autograd, which "
        "supports ghost batch norm only; torch.autograd.forward_ad and double backward work in every mode",
    )


# Whether a torch.func transform is running (False where this torch cannot say); the C
# function itself where it exists: the converted modules ask on every call.
func_transforms_active: Callable[[], bool] = _transforms_active or (lambda: False)


# -- fx: the tracer that re-traces a saved GraphModule's code when it is loaded

_TRACER_ATTRIBUTE = "_tracer_cls"
if not hasattr(torch.fx.Graph(), _TRACER_ATTRIBUTE):
    _missing(
        "fx.Graph._tracer_cls",
        "a bnfx.transform GraphModule saved with torch.save cannot be loaded (fx re-traces bnfx's run-time "
        "functions); save its state_dict, or export it (bnfx.transform of a torch.export program saves and loads)",
    )


def set_graph_tracer(graph: torch.fx.Graph, tracer_class: type) -> None:
    """Make ``torch.load`` of a GraphModule over ``graph`` re-trace it with ``tracer_class``."""
    if hasattr(graph, _TRACER_ATTRIBUTE):
        setattr(graph, _TRACER_ATTRIBUTE, tracer_class)


# -- distributed: process groups by name, and a group's timeout

_resolve = getattr(dist.distributed_c10d, "_resolve_process_group", None) if dist.is_available() else None
if dist.is_available() and _resolve is None:
    _missing(
        "torch.distributed.distributed_c10d._resolve_process_group",
        "sync mode cannot find a process group by name (sync='name', or nn.SyncBatchNorm's group); "
        "pass the ProcessGroup itself",
    )


def resolve_process_group(group_name: str) -> dist.ProcessGroup:
    """The process group named ``group_name`` (what bnfx's graphs and ops name)."""
    if _resolve is None:
        raise RuntimeError(f"this torch ({torch.__version__}) cannot resolve process group {group_name!r} by name")
    return _resolve(group_name)


_timeout_unreadable_said = False


def group_timeout(group: dist.ProcessGroup):
    """``group``'s collective timeout, for a communicator beside it (None: torch's default)."""
    global _timeout_unreadable_said
    for device_type in getattr(group, "_device_types", ()):
        try:
            return group._get_backend(torch.device(device_type)).options._timeout
        except (AttributeError, RuntimeError):
            continue
    if not _timeout_unreadable_said:
        _timeout_unreadable_said = True
        _missing(
            "readable process-group timeout (ProcessGroup._get_backend(...).options._timeout)",
            "bnfx's sync communicator waits torch's default timeout, not your group's",
        )
    return None


# -- distributed: an all-reduce inductor compiles (dist.all_reduce mutates its argument and
# takes a group object; the functional collectives, which Dynamo traces dist.all_reduce into,
# take the group's name and return the result)

_functional_ops = getattr(torch.ops, "_c10d_functional", None) if dist.is_available() else None
has_functional_collectives = all(
    hasattr(_functional_ops, name) for name in ("all_reduce", "wait_tensor")
) if _functional_ops is not None else False
if dist.is_available() and not has_functional_collectives:
    _missing(
        "torch.ops._c10d_functional.all_reduce / wait_tensor",
        "under inductor bnfx's sync batch norm runs as one opaque op, not fused with the layers around it "
        "(correct, slower)",
    )


def functional_all_reduce(tensor: torch.Tensor, group_name: str) -> torch.Tensor:
    """The sum of ``tensor`` over the group named ``group_name``, a new tensor."""
    return _functional_ops.wait_tensor(_functional_ops.all_reduce(tensor, "sum", group_name))


# -- C++: the CPU kernels (bnfx/ops/csrc) find a process group by name with
# c10d::resolve_process_group (GroupRegistry.hpp, the registry the lookup above reads). They are
# compiled against the installed torch: a torch without that header builds no C++ kernels, and a
# build loaded under another torch fails to load; device_kernels.cpu_kernels says either (INFO
# where none was built, WARNING where one fails to load), and the ops run their default bodies.


# -- ops: the argument names of an op's schema (OpOverload has no public accessor)

if not hasattr(torch.ops.aten.batch_norm.default, "_schema"):
    _missing(
        "OpOverload._schema",
        "bnfx cannot read the arguments of aten and bnfx ops: exported and Dynamo graphs are not rewritten; "
        "bnfx.convert(model, ...) works without it",
    )


def op_arguments(op) -> list:
    """The arguments of ``op`` (an OpOverload, or a custom op's definition) in its schema, in order."""
    return list(op_schema(op).arguments)


def op_schema(op):
    """The schema of ``op`` (an OpOverload, or a custom op's definition): ``.name``
    ("bnfx::ghost_batch_norm"), ``.arguments``, and its text as ``str``."""
    return getattr(op, "_opoverload", op)._schema


# -- the dispatcher: kernels registered for the length of a block (device_kernels.default_bodies)

if not hasattr(torch.library.Library, "_destroy"):
    _missing(
        "torch.library.Library._destroy",
        "bnfx.ops.device_kernels.default_bodies('cpu') cannot put the C++ CPU kernels back and raises; the ops "
        "themselves are unaffected",
    )


@contextlib.contextmanager
def kernels_for_block(namespace: str, dispatch_key: str, kernels: dict):
    """Within the block, ``kernels`` ({op name: Python function}) serve ``namespace``'s ops for
    ``dispatch_key`` ("CPU"), above what was registered there; after it, those serve again."""
    if not hasattr(torch.library.Library, "_destroy"):
        raise RuntimeError(f"this torch ({torch.__version__}) cannot unregister kernels after a block")
    library = torch.library.Library(namespace, "IMPL")
    try:
        with warnings.catch_warnings():
            # the dispatcher's note that a kernel is overridden: here, on purpose and for a block
            warnings.filterwarnings("ignore", message=".*Overriding a previously registered kernel")
            for name, kernel in kernels.items():
                library.impl(name, kernel, dispatch_key)
        yield
    finally:
        library._destroy()


# -- export: a program around a rewritten graph (ExportedProgram's constructor is not documented)

_PROGRAM_FIELDS = ("root", "graph", "graph_signature", "state_dict", "range_constraints", "module_call_graph",
                   "example_inputs", "constants", "verifiers")
_program_parameters = inspect.signature(torch.export.ExportedProgram.__init__).parameters
_program_constructible = all(field in _program_parameters for field in _PROGRAM_FIELDS)
if not _program_constructible:
    _missing(
        f"torch.export.ExportedProgram({'=, '.join(_PROGRAM_FIELDS)}=)",
        "bnfx.transform cannot rewrite a torch.export program; bnfx.convert(model, ...) before torch.export "
        "exports the rewritten model",
    )


def exported_program(**fields) -> torch.export.ExportedProgram:
    """An ExportedProgram of ``fields`` (each of ``_PROGRAM_FIELDS``)."""
    if not _program_constructible:
        raise RuntimeError(f"this torch ({torch.__version__}) builds no ExportedProgram the way bnfx does; "
                           "bnfx.convert(model, ...) before torch.export exports the rewritten model")
    return torch.export.ExportedProgram(**fields)


# -- symbolic sizes: the value a size has in the call being compiled, for error messages

def size_hint(size):
    """``size`` as a number: under dynamic shapes, its value in the call being compiled (the
    hint of its SymNode), else ``size`` as it is; only messages read it, so a torch without
    hints shows the symbol instead."""
    hint = getattr(getattr(size, "node", None), "hint", None)
    return size if hint is None else hint


# -- fake tensors and dispatch modes, for export's metadata and population statistics

from torch._guards import detect_fake_mode  # noqa: E402  (the fake mode of a graph's values)
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402  (no public path)


# -- inductor's default decomposition table (torch._inductor.decomposition.decompositions): bnfx's
# ops join it, so that every inductor compile of a graph holding them (a converted model under
# torch.compile's default backend, AOTInductor) fuses their primitives with the layers around.
# Importing inductor costs seconds: the table is extended when something else imports it.

_INDUCTOR_DECOMPOSITIONS = "torch._inductor.decomposition"


def extend_inductor_decompositions(decompositions: dict, then: Callable[[], None]) -> None:
    """``decompositions`` in inductor's default table, then ``then()``: now if inductor is
    loaded, else when it loads (WARNING if a torch release moved the table: the ops then run
    opaque, correct)."""

    def extend(module) -> None:
        table = getattr(module, "decompositions", None)
        if not isinstance(table, dict):
            _missing(f"{_INDUCTOR_DECOMPOSITIONS}.decompositions",
                     "under inductor (torch.compile's default backend and backend=\"bnfx\") bnfx's ops run "
                     "opaque (correct, not fused)")
            return
        table.update(decompositions)
        then()

    module = sys.modules.get(_INDUCTOR_DECOMPOSITIONS)
    if module is not None:
        extend(module)
    else:
        sys.meta_path.insert(0, _AfterImport(_INDUCTOR_DECOMPOSITIONS, extend))


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs ``then(module)`` once the module ``name`` has executed, wherever it is imported."""

    def __init__(self, name: str, then: Callable) -> None:
        self.name, self.then = name, then

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        exec_module, then = spec.loader.exec_module, self.then

        def exec_then(module):
            exec_module(module)
            then(module)

        spec.loader.exec_module = exec_then
        return spec


# -- compilers behind bnfx's backend: Dynamo's aot_eager, inductor with bnfx's decompositions


def aot_eager_compile(gm, example_inputs):
    from torch._dynamo.backends.debugging import aot_eager

    return aot_eager(gm, example_inputs)


def inductor_compile(gm, example_inputs, mode: str | None):
    """Inductor on ``gm`` in torch.compile's ``mode``, with its default decompositions (bnfx's
    among them). A table passed to inductor would turn its FX graph cache off: it cannot key it."""
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    patches = list_mode_options(mode) if mode not in (None, "default") else None
    return compile_fx(gm, example_inputs, config_patches=patches)


# -- Dynamo: its compile-start callbacks, and the frame a compile on this thread compiles
# (bnfx.frame_watch). Checked when the backend is first looked up.

_dynamo_checked: bool | None = None


def dynamo_frames() -> bool:
    """Whether the Dynamo internals the frame watcher reads are there (WARNING once if not)."""
    global _dynamo_checked
    if _dynamo_checked is None:
        import torch._dynamo

        handler = getattr(torch._dynamo, "callback_handler", None)
        compile_fn = getattr(getattr(torch._dynamo, "convert_frame", None), "_compile", None)
        _dynamo_checked = (
            handler is not None and isinstance(getattr(handler, "start_callbacks", None), list)
            and hasattr(handler, "register_start_callback") and compile_fn is not None
        )
        if not _dynamo_checked:
            _missing(
                "Dynamo compile-start callbacks or convert_frame._compile",
                'torch.compile(model, backend="bnfx") cannot give its batch norms traceable forwards: '
                "momentum=None and nn.SyncBatchNorm modules, and DDP over nn.Sequential, run plain batch norm. "
                "bnfx.convert(model, ...) and bnfx.transform work without it",
            )
    return _dynamo_checked


def dynamo_start_callbacks():
    """Dynamo's callback handler (its ``start_callbacks`` list and ``register_start_callback``)."""
    import torch._dynamo

    return torch._dynamo.callback_handler


def dynamo_compiling(start) -> tuple[Any, Any]:
    """``(frame, compiler_fn)`` of the Dynamo compile on the stack from ``start`` up: the frame
    it compiles and the compiler function torch.compile gave it; ``(None, None)`` where no
    compile is on the stack (a callback run from elsewhere)."""
    import inspect

    import torch._dynamo.convert_frame

    code = inspect.unwrap(torch._dynamo.convert_frame._compile).__code__
    caller = start
    while caller is not None and caller.f_code is not code:
        caller = caller.f_back
    if caller is None:
        return None, None
    names = caller.f_locals
    if "frame" not in names or "compiler_fn" not in names:
        raise RuntimeError("Dynamo's convert_frame._compile no longer names its locals frame and compiler_fn")
    return names["frame"], names["compiler_fn"]


def dynamo_backend_of(compiler_fn: Any) -> tuple[Any, dict]:
    """``(backend, options)``: the compiler function torch.compile wraps (a backend name's
    function, or a callable), and the ``options`` torch.compile passes it."""
    wrapper = getattr(compiler_fn, "_torchdynamo_orig_backend", compiler_fn)
    backend = getattr(wrapper, "compiler_fn", wrapper)
    return backend, (getattr(wrapper, "kwargs", None) or {}).get("options") or {}
