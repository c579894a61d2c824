"""bnfx in torch.compile's cache keys, so that a warm start never serves code bnfx did not make.

torch's compile caches (AOTAutograd's, inductor's FX graph cache) key on the graph that reaches
AOTAutograd, torch's version and config. bnfx's options are in that graph (its ops and their
arguments: chunk size, sync group, freeze), but two things bnfx changes are not: inductor's
decomposition table, which bnfx extends with its ops' decompositions, and bnfx's own code. Both
go into the one key component torch offers for this, ``torch.compiler.config.cache_key_tag``:
bnfx's fingerprint (its version, the source of its package, the code of each decomposition).
A different bnfx compiles anew; the same bnfx with the same options hits.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import pathlib
import types

import torch

import bnfx

_MARK = "bnfx:"


def fingerprint(decompositions: dict) -> str:
    """bnfx's version, package source and ``decompositions``' code, hashed."""
    digest = hashlib.blake2b(digest_size=10)
    digest.update(bnfx.__version__.encode())
    digest.update(_package_source())
    for op, decomposition in sorted(decompositions.items(), key=lambda item: str(item[0])):
        digest.update(str(op).encode())
        digest.update(_code(decomposition))
    return digest.hexdigest()


def keyed(decompositions: dict) -> str:
    """torch's cache key tag with bnfx's fingerprint in place of any earlier one: the user's
    own tag (``TORCH_COMPILE_CACHE_KEY_TAG``) is kept."""
    tag = torch.compiler.config.cache_key_tag
    own = [part for part in tag.split(" ") if part and not part.startswith(_MARK)]
    return " ".join([*own, _MARK + fingerprint(decompositions)])


def add_fingerprint(decompositions: dict) -> None:
    """Key every compile of this process on bnfx's fingerprint (bnfx extends inductor's default
    decomposition table for every compile: its key changes with it)."""
    torch.compiler.config.cache_key_tag = keyed(decompositions)


@functools.cache
def _package_source() -> bytes:
    """Every Python file of bnfx's packages, by relative path (once per process: milliseconds)."""
    digest = hashlib.blake2b(digest_size=16)
    passes = importlib.util.find_spec("bnfx.passes").submodule_search_locations  # (not imported)
    for root in [pathlib.Path(bnfx.__file__).parent, *map(pathlib.Path, passes)]:
        for path in sorted(root.rglob("*.py")):
            digest.update(str(path.relative_to(root)).encode())
            digest.update(path.read_bytes())
    return digest.digest()


def _code(function) -> bytes:
    """What a function computes, without where it lives (a replaced decomposition differs)."""
    if isinstance(function, functools.partial):
        return _code(function.func) + repr((function.args, sorted(function.keywords.items()))).encode()
    code = getattr(function, "__code__", None)
    if code is None:
        return repr(function).encode()
    return _code_object(code)


def _code_object(code: types.CodeType) -> bytes:
    consts = b"".join(_code_object(c) if isinstance(c, types.CodeType) else repr(c).encode()
                      for c in code.co_consts)
    return code.co_code + consts + repr(code.co_names).encode()
