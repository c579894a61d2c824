"""What every sync all-reduce carries besides its sums: which collective it is.

Each ``bnfx::sync_batch_norm`` all-reduce (forward and backward) appends three float64
values to its sums: two 20-bit tags of its site (a hash of the site's name; the backward
swaps them, so a site's forward never pairs with its backward unseen) and its position in
the chain of sync collectives (``order``, the value the previous collective passed on).
After the all-reduce every slot must hold ``world`` times this rank's value; a rank whose
peer ran another site, direction or position sees a different sum. Every rank sees the same
sums, and a slot differs from ``world`` times a value for every rank unless the values all
agree (or their mean equals it in both tags at once: one chance in 2^40), so every rank
raises at the same collective instead of pairing sums of different layers.

The values are small integers, exact in float64 for groups of up to 2^33 ranks. The check
costs nothing measurable: on CPU a compare of three numbers; on CUDA and in compiled code an
asynchronous device-side assert (``torch._assert_async``), no host synchronization.
"""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor

TAG_BITS = 20
_TAG_MASK = (1 << TAG_BITS) - 1
SLOTS = 3  # tag, other tag, position

# site -> its name, for the message a mismatch raises (every site this process tagged)
_names: dict[int, str] = {}


def site_tag(name: str) -> int:
    """The ``site`` argument of the sync ops for the site called ``name`` (a module path, a
    graph node): two 20-bit hashes in one int, never 0 (0: an untagged direct call)."""
    digest = int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little")
    tag = (digest & ((1 << 2 * TAG_BITS) - 1)) or 1
    _names.setdefault(tag, name)
    return tag


def _tags(site: int, direction: str) -> tuple[float, float]:
    first, second = float(site & _TAG_MASK), float(site >> TAG_BITS)
    return (first, second) if direction == "forward" else (second, first)


def slots(site: int, direction: str, order: Tensor | None, like: Tensor) -> Tensor:
    """This rank's ``[tag, tag, position]`` [3] float64 on ``like``'s device; ``order``: the
    position the previous collective passed on ([1]; None: the first)."""
    tags = like.new_tensor(_tags(site, direction), dtype=torch.float64)
    position = like.new_zeros(1, dtype=torch.float64) if order is None else order.detach().to(torch.float64)
    return torch.cat([tags, position.reshape(1)])


def next_order(reduced: Tensor, world: int) -> Tensor:
    """The position the next collective carries: one after this one's (read from the reduced
    slots, so the next collective waits for this one by data dependency)."""
    return reduced[-1:] / world + 1


def check(reduced: Tensor, own: Tensor, world: int, site: int, direction: str, group_name: str,
          traced: bool) -> None:
    """Raise on every rank where the reduced slots are not ``world`` times this rank's.

    ``traced``: inside a graph being compiled (the decompositions), or on a device other than
    the CPU: an asynchronous assert, whose message names this rank's site; else the check on
    the host, naming this rank's site and, where the peers agree among themselves, theirs."""
    expected = own * world
    if traced or reduced.device.type != "cpu":
        torch._assert_async(
            torch.all(reduced == expected),
            f"bnfx: the sync batch-norm collectives of process group {group_name} do not match across its ranks: "
            f"this rank's {direction} all-reduce of {_site_name(site)} met another collective on a peer rank",
        )
        return
    if torch.equal(reduced, expected):
        return
    raise_mismatch(reduced.tolist(), own.tolist(), world, site, direction, group_name)


def raise_mismatch(reduced: list[float], own: list[float], world: int, site: int, direction: str,
                   group_name: str) -> None:
    """The mismatch error (the C++ kernels call it too, through ``bnfx::collective_mismatch``)."""
    peers = _describe_peers(reduced, own, world)
    raise RuntimeError(
        f"bnfx: the sync batch-norm collectives of process group {group_name} do not match across its ranks: "
        f"this rank's {direction} all-reduce of {_site_name(site)} (collective {int(own[2])} of its chain) met "
        f"{peers}. Every rank must run the same model, converted or compiled with the same bnfx options, and "
        "reach its sync batch norms in the same order"
    )


def _site_name(site: int) -> str:
    return f"site '{_names[site]}'" if site in _names else ("an untagged site" if site == 0 else f"site #{site}")


def _describe_peers(reduced: list[float], own: list[float], world: int) -> str:
    """The peers' collective, where they all ran the same one (their mean is a whole value)."""
    if world < 2:
        return "another collective"
    mean = [(r - o) / (world - 1) for r, o in zip(reduced, own)]
    if not all(m == int(m) and m >= 0 for m in mean):
        return "collectives of different sites on its peers"
    first, second, position = (int(m) for m in mean)
    direction, site = "forward", first | (second << TAG_BITS)
    if site not in _names and (second | (first << TAG_BITS)) in _names:
        direction, site = "backward", second | (first << TAG_BITS)
    return f"the {direction} all-reduce of {_site_name(site)} (collective {position} of its chain) on its peers"


_library = torch.library.Library("bnfx", "FRAGMENT")
_library.define(
    "collective_mismatch(float[] reduced, float[] own, int world, int site, str direction, str group_name) -> ()"
)
_library.impl("collective_mismatch", raise_mismatch, "CompositeExplicitAutograd")
