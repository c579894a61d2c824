"""What the passes did to each batch-norm site: the record behind ``bnfx.explain``."""

from __future__ import annotations

from dataclasses import dataclass, field

from tabulate import tabulate


@dataclass(frozen=True)
class SiteRecord:
    name: str
    form: str
    action: str  # "ghost", or "left alone"
    reason: str = ""


@dataclass
class Report:
    """One record per batch-norm site; ``print(report)`` shows them as a table."""

    records: list[SiteRecord] = field(default_factory=list)

    def rewritten(self, site, action: str, detail: str = "") -> None:
        self.records.append(SiteRecord(site.name, site.form, action, detail))

    def left_alone(self, site, reason: str) -> None:
        self.records.append(SiteRecord(site.name, site.form, "left alone", reason))

    @property
    def found(self) -> int:
        return len(self.records)

    @property
    def rewritten_count(self) -> int:
        return sum(r.action != "left alone" for r in self.records)

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self):
        return iter(self.records)

    def __str__(self) -> str:
        rows = [(r.name, r.form, r.action, r.reason) for r in self.records]
        table = tabulate(rows, headers=["site", "IR form", "action", "detail"], tablefmt="simple")
        return f"{table}\n{self.found} batch-norm sites, {self.rewritten_count} rewritten"
