"""The torch.compile backend: bnfx passes on Dynamo's graph, then an inner compiler."""

from __future__ import annotations

import itertools
import logging
import os
from typing import Any, Callable

import torch
from torch import fx

from bnfx import compile_cache, frame_watch, torch_internals
from bnfx.options import ENVIRONMENT_VARIABLE, Options, resolve_backend_options
from bnfx.passes import Report
from bnfx.rewriting import rewrite_graph

log = logging.getLogger("bnfx")
_graph_ids = itertools.count()
# The report of every graph the backend compiled in this process, in order: what it did,
# readable by programs (the log line is for people).
graph_reports: list[Report] = []


def backend(**options) -> Callable:
    """A torch.compile backend with the given options, checked now; ``mode`` is inductor's
    (torch.compile's ``mode``, given here or to torch.compile). Options it leaves out may come
    from the ``BNFX_OPTIONS`` environment variable, as for ``backend="bnfx"``.

    >>> torch.compile(model, backend=bnfx.backend(ghost_batch_size=16, mode="max-autotune"))
    """
    resolve_backend_options(options)
    frame_watch.watch()
    chosen = dict(options)

    @frame_watch.mark_bnfx_backend
    def bnfx_compile(gm: fx.GraphModule, example_inputs: list[Any], options: dict | None = None,
                     mode: str | None = None):
        # torch.compile(..., mode=...) or (..., options=...) passes its own: the same vocabulary
        opts = resolve_backend_options(_with_mode({**chosen, **(options or {})}, mode))
        return _compile(gm, example_inputs, opts)

    bnfx_compile._bnfx_options = chosen  # what the frame watcher reads
    return bnfx_compile


@frame_watch.mark_bnfx_backend
def bnfx_backend(gm: fx.GraphModule, example_inputs: list[Any], options: dict | None = None, mode: str | None = None):
    """The backend registered as "bnfx" for ``torch.compile(model, backend="bnfx", options=...)``
    (a ``mode`` goes in the options: torch.compile refuses both). Options not given there come
    from the ``BNFX_OPTIONS`` environment variable, if set: ``BNFX_OPTIONS="ghost_batch_size=16"``."""
    return _compile(gm, example_inputs, resolve_backend_options(_with_mode(dict(options or {}), mode)))


def _with_mode(options: dict, mode: str | None) -> dict:
    if mode is not None and options.get("mode", mode) != mode:
        raise ValueError(f"mode given twice: mode={mode!r} and options mode={options['mode']!r}")
    return options if mode is None else {**options, "mode": mode}


def _compile(gm: fx.GraphModule, example_inputs: list[Any], opts: Options):
    frame_watch.watch()
    report = rewrite_graph(gm, opts)
    graph_reports.append(report)
    from_environment = os.environ.get(ENVIRONMENT_VARIABLE, "").strip()
    log.info(
        "bnfx graph %d: %s; options %s%s",
        next(_graph_ids), report.summary(), opts.describe(),
        f"; {ENVIRONMENT_VARIABLE}={from_environment!r}" if from_environment else "",
    )
    return _inner_compile(opts.inner, gm, example_inputs, opts.compile_mode)


def _inner_compile(inner, gm: fx.GraphModule, example_inputs: list[Any], mode: str | None):
    if callable(inner):
        return inner(gm, example_inputs)
    if inner == "eager":
        return gm.forward
    if inner == "aot_eager":
        return torch_internals.aot_eager_compile(gm, example_inputs)
    from bnfx.ops import DECOMPOSITIONS

    # Inductor's default table holds bnfx's decompositions: it fuses their primitives with their
    # neighbours. torch's caches key on bnfx's fingerprint (what the graph does not show), kept
    # in the process's tag: the backward compiles later, out of any scope.
    compile_cache.add_fingerprint(DECOMPOSITIONS)
    return torch_internals.inductor_compile(gm, example_inputs, mode)
