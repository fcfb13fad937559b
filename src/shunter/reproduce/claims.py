"""A paper's claims as data: the paper's figure and the rule that judges ours against it.

Each paper module states its claims up front (a Claim: what is claimed, the paper's figure, the
rule), runs its experiment, and puts our figure beside each claim (a Row). Whether a row reproduces
is the rule applied to the two figures, never a separate test in the experiment's code.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class Figure:
    """A figure as printed (`text`) and as judged and plotted: the range [low, high], low == high
    for a single value; None when there is no number (e.g. no bubble-free n exists)."""

    text: str
    low: float | None = None
    high: float | None = None

    @classmethod
    def value(cls, value: float | None, text: str) -> Figure:
        return cls(text, value, value)


class Rule(Protocol):
    """When our figure reproduces the paper's; str(rule) says it in words ("within 25%")."""

    def holds(self, ours: Figure, paper: Figure) -> bool: ...


class _TopValues:
    """A rule on the top of each range (an "up to" figure is its top); no number never holds."""

    def holds(self, ours: Figure, paper: Figure) -> bool:
        if ours.high is None or paper.high is None:
            return False
        return self.compare(ours.high, paper.high)

    def compare(self, ours: float, paper: float) -> bool:
        raise NotImplementedError


@dataclass(frozen=True)
class WithinRelative(_TopValues):
    """|ours / paper - 1| <= tolerance."""

    tolerance: float  # 0.25: within 25%

    def compare(self, ours: float, paper: float) -> bool:
        return abs(ours / paper - 1) <= self.tolerance

    def __str__(self) -> str:
        return f"within {self.tolerance:.0%}"


@dataclass(frozen=True)
class WithinPoints(_TopValues):
    """|ours - paper| <= points, for figures that are percentages."""

    points: float

    def compare(self, ours: float, paper: float) -> bool:
        return abs(ours - paper) <= self.points

    def __str__(self) -> str:
        return f"within {self.points:g} points"


@dataclass(frozen=True)
class WithinFactor(_TopValues):
    """paper / factor <= ours <= paper * factor."""

    factor: float  # 2: within 2x either way

    def compare(self, ours: float, paper: float) -> bool:
        return 1 / self.factor <= ours / paper <= self.factor

    def __str__(self) -> str:
        return f"within {self.factor:g}x"


@dataclass(frozen=True)
class GainWithinFactor(_TopValues):
    """For speedups: our gain (ours - 1) within `factor` either way of the paper's (paper - 1)."""

    factor: float

    def compare(self, ours: float, paper: float) -> bool:
        return 1 / self.factor <= (ours - 1) / (paper - 1) <= self.factor

    def __str__(self) -> str:
        return f"our gain within a factor {self.factor:g} of the paper's"


@dataclass(frozen=True)
class RangesOverlap:
    """Our range and the paper's share a point (a single value: it lies inside the paper's range)."""

    def holds(self, ours: Figure, paper: Figure) -> bool:
        if None in (ours.low, ours.high, paper.low, paper.high):
            return False
        return ours.low <= paper.high and paper.low <= ours.high  # type: ignore[operator]

    def __str__(self) -> str:
        return "ranges overlap"


@dataclass(frozen=True)
class Claim:
    """One result a paper reports: what (`label`), its figure, and the rule ours is judged by."""

    label: str
    paper: Figure
    rule: Rule
    unit: str = "x"  # of low and high: "x" (a ratio), "tok/s", "ms", "%", "batches"

    def holds(self, ours: Figure) -> bool:
        return self.rule.holds(ours, self.paper)

    def beside(self, ours: Figure, why: str, inputs: dict[str, object] | None = None) -> Row:
        """Our figure beside the paper's; `why` explains the difference (or the agreement)."""
        return Row(self, ours, why, inputs or {})


@dataclass(frozen=True)
class Row:
    """A claim with our figure beside it: reproduced when the claim's rule holds."""

    claim: Claim
    ours: Figure
    why: str
    inputs: dict[str, object] = field(default_factory=dict)  # what our figure was computed from

    @property
    def label(self) -> str:
        return self.claim.label

    @property
    def paper(self) -> Figure:
        return self.claim.paper

    @property
    def unit(self) -> str:
        return self.claim.unit

    @property
    def reproduced(self) -> bool:
        return self.claim.holds(self.ours)

    def to_dict(self) -> dict[str, object]:
        return {
            "label": self.label,
            "ours": self.ours.text,
            "paper": self.paper.text,
            "reproduced": self.reproduced,
            "why": self.why,
            "unit": self.unit,
            "ours_low": self.ours.low,
            "ours_high": self.ours.high,
            "paper_low": self.paper.low,
            "paper_high": self.paper.high,
            "inputs": self.inputs,
        }


@dataclass(frozen=True)
class Reproduction:
    """One paper's experiment: its settings in words, and a row per claim."""

    paper: str
    title: str
    settings: tuple[str, ...]
    rows: tuple[Row, ...]
    seconds: float  # wall time of the experiment

    def to_dict(self) -> dict[str, object]:
        return {
            "paper": self.paper,
            "title": self.title,
            "settings": list(self.settings),
            "rows": [row.to_dict() for row in self.rows],
            "seconds": self.seconds,
        }


def format_range(low: float, high: float, unit: str = "x", digits: int = 2) -> str:
    """'1.20-1.50x', or '1.20x' when both ends print the same."""
    if abs(high - low) < 0.5 * 10**-digits:
        return f"{low:.{digits}f}{unit}"
    return f"{low:.{digits}f}-{high:.{digits}f}{unit}"


def table_lines(reproduction: Reproduction) -> list[str]:
    """The reproduction as `shunter reproduce` prints it: title, settings, one row per claim with
    its reason, and how many reproduced."""
    lines = [f"{reproduction.title}  ({reproduction.seconds:.1f} s)"]
    for line in reproduction.settings:
        lines.append(textwrap.fill(line, 110, initial_indent="  - ", subsequent_indent="    "))
    columns = ["result", "ours", "paper", "reproduced"]
    cells = [[r.label, r.ours.text, r.paper.text, "yes" if r.reproduced else "NO"] for r in reproduction.rows]
    widths = [max(len(c), *(len(row[k]) for row in cells)) for k, c in enumerate(columns)]
    lines.append("")
    lines.append("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    for row, r in zip(cells, reproduction.rows, strict=True):
        lines.append("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))
        lines.append(textwrap.fill(r.why, 110, initial_indent="      why: ", subsequent_indent="           "))
    held = sum(r.reproduced for r in reproduction.rows)
    lines.append(f"\n{held} of {len(reproduction.rows)} rows reproduced")
    return lines
