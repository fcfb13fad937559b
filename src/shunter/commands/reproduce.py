"""`shunter reproduce aurora|lina|klotski`: a paper's experiment on our cost model, beside the paper."""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path

PAPERS = ("aurora", "lina", "klotski")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "reproduce",
        help="re-run a paper's experiment (aurora, lina, klotski) on the simulator, beside its numbers",
        description="Re-create the headline results of Aurora, Lina or Klotski with the paper's stated "
        "settings on Shunter's cost model; print our numbers beside the paper's, each row marked reproduced "
        "or not with the reason. Routing comes from synthetic Zipf traces with the skew shown.",
    )
    parser.add_argument("paper", choices=PAPERS, help="which paper's experiment")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--plot", metavar="FILE.png", help="draw ours beside the paper's to this PNG")
    parser.add_argument("--quick", action="store_true", help="smaller workloads (seconds; for tests)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from shunter.sim.reproduce import reproduce

    result = reproduce(args.paper, quick=args.quick)
    if args.plot:
        from shunter.sim.plots import plot_reproduction

        plot_reproduction(result, Path(args.plot))
    if args.json:
        json.dump(result.to_dict(), sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    print(f"{result.title}  ({result.seconds:.1f} s)")
    for line in result.settings:
        print(textwrap.fill(line, 110, initial_indent="  - ", subsequent_indent="    "))
    columns = ["result", "ours", "paper", "reproduced"]
    rows = [[r.label, r.ours, r.paper, "yes" if r.reproduced else "NO"] for r in result.rows]
    widths = [max(len(c), *(len(row[k]) for row in rows)) for k, c in enumerate(columns)]
    print()
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    for row, r in zip(rows, result.rows, strict=True):
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))
        print(textwrap.fill(r.why, 110, initial_indent="      why: ", subsequent_indent="           "))
    held = sum(r.reproduced for r in result.rows)
    print(f"\n{held} of {len(result.rows)} rows reproduced")
    if args.plot:
        print(f"plot written to {args.plot}")
    return 0
