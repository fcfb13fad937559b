"""The papers' experiments (Aurora, Lina, Klotski) and the planner's figures, re-run beside theirs."""

from __future__ import annotations

from shunter.reproduce.aurora import reproduce_aurora
from shunter.reproduce.claims import Reproduction
from shunter.reproduce.klotski import reproduce_klotski
from shunter.reproduce.lina import reproduce_lina

PAPERS = ("aurora", "lina", "klotski")


def reproduce(paper: str, quick: bool = False) -> Reproduction:
    """One paper's experiment with our figure beside each of its claims; `quick` shrinks the
    workloads (seconds, for tests). ValueError for a paper not in PAPERS."""
    if paper == "aurora":
        return reproduce_aurora(quick)
    if paper == "lina":
        return reproduce_lina(quick)
    if paper == "klotski":
        return reproduce_klotski(quick)
    raise ValueError(f"unknown paper {paper!r}")
