"""What the passes did to each batch-norm site: the record behind ``bnfx.explain``."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from tabulate import tabulate

log = logging.getLogger("bnfx")
# Warnings already given in this process: a recompiled graph does not repeat them.
_warned: set[str] = set()

# Left alone on purpose: batch norm there uses running statistics, as the user asked.
EVAL_MODE = "eval mode: normalizes with running statistics"


@dataclass(frozen=True)
class SiteRecord:
    name: str
    form: str
    action: str  # "ghost", "sync", "frozen", "folded", or "left alone"
    reason: str = ""
    warning: str = ""  # what a rewritten site does not do as asked, said at WARNING level
    earlier: bool = False  # made by bnfx.convert or an earlier rewrite: computes with its own options

    @property
    def stays_plain(self) -> bool:
        """A site that would use batch statistics and computes them as plain batch norm does."""
        return self.action == "left alone" and self.reason != EVAL_MODE


@dataclass
class Report:
    """One record per batch-norm site; ``print(report)`` shows them as a table."""

    records: list[SiteRecord] = field(default_factory=list)
    done: str = "rewritten"  # what the summary line calls the sites that were changed

    def rewritten(self, site, action: str, detail: str = "", warning: str = "") -> None:
        self.records.append(SiteRecord(site.name, site.form, action, detail + (f"; {warning}" if warning else ""),
                                       warning))

    def made_earlier(self, site, action: str, origin: str, asked, ghost_batch_size: int | None = None) -> None:
        """A site ``origin`` (``bnfx.convert``, an earlier rewrite) made: it computes ``action``
        ("ghost" with ``ghost_batch_size``, "sync", "frozen"), never what this rewrite's options
        ``asked`` say; where those ask for something else, the record carries a warning."""
        made = f"ghost_batch_size={ghost_batch_size}" if action == "ghost" else action
        wanted = "frozen" if asked.freeze else asked.mode
        same = action == wanted and (action != "ghost" or ghost_batch_size == asked.ghost_batch_size)
        warning = "" if same else (
            f"made by {origin} with {made}, which it keeps: this rewrite's {asked.describe()} does not apply "
            "(bnfx.revert a converted model first to rewrite it)")
        self.records.append(SiteRecord(site.name, site.form, action,
                                       f"made by {origin}: {made}" + (f"; {warning}" if warning else ""),
                                       warning, earlier=True))

    def left_alone(self, site, reason: str, warning: str = "") -> None:
        self.records.append(SiteRecord(site.name, site.form, "left alone", reason, warning))

    @property
    def found(self) -> int:
        return len(self.records)

    @property
    def rewritten_count(self) -> int:
        """The sites that compute bnfx's batch norm, converted ones included."""
        return sum(r.action != "left alone" for r in self.records)

    @property
    def earlier_count(self) -> int:
        return sum(r.earlier for r in self.records)

    def summary(self) -> str:
        """"20 batch-norm sites, 20 rewritten (20 of them made earlier, with their own options)"."""
        earlier = f" ({self.earlier_count} of them made earlier, by bnfx.convert or a rewrite, with their own " \
            "options)" if self.earlier_count else ""
        return f"{self.found} batch-norm sites, {self.rewritten_count} {self.done}{earlier}"

    @property
    def plain(self) -> list[SiteRecord]:
        """The sites bnfx was asked to rewrite and did not."""
        return [r for r in self.records if r.stays_plain]

    def warn_plain_sites(self) -> None:
        """Say at WARNING level, once per process and reason, which sites stay plain batch norm
        (and what rewritten sites with a warning do not do)."""
        by_reason: dict[str, list[str]] = {}
        for record in self.plain:
            by_reason.setdefault(record.reason, []).append(record.name)
        messages = [
            f"bnfx: {len(names)} batch-norm site{'s' if len(names) > 1 else ''} "
            f"stay{'' if len(names) > 1 else 's'} plain batch norm ({reason}): {', '.join(names)}"
            for reason, names in by_reason.items()
        ]
        by_warning: dict[str, list[str]] = {}
        for record in self.records:
            if record.warning:
                by_warning.setdefault(record.warning, []).append(record.name)
        messages += [f"bnfx: batch-norm sites {', '.join(names)}: {warning}" for warning, names in by_warning.items()]
        for message in messages:
            if message not in _warned:
                _warned.add(message)
                log.warning(message)

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self):
        return iter(self.records)

    def __str__(self) -> str:
        rows = [(r.name, r.form, r.action, r.reason) for r in self.records]
        table = tabulate(rows, headers=["site", "IR form", "action", "detail"], tablefmt="simple")
        return f"{table}\n{self.summary()}"
