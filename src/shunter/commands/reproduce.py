"""`shunter reproduce aurora|lina|klotski`: a paper's experiment on our cost model, beside the paper."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

PAPERS = ("aurora", "lina", "klotski")  # shunter.reproduce.PAPERS, without importing the experiments


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
    parser.add_argument(
        "--plot", metavar="FILE", help="draw ours beside the paper's to this .png, .pdf or .svg"
    )
    parser.add_argument("--quick", action="store_true", help="smaller workloads (seconds; for tests)")
    parser.set_defaults(func=run, outputs={"plot": "figure"})


def run(args: argparse.Namespace) -> int:
    from shunter.reproduce import reproduce
    from shunter.reproduce.claims import table_lines

    result = reproduce(args.paper, quick=args.quick)
    if args.plot:
        from shunter.reproduce.plots import plot_reproduction

        plot_reproduction(result, Path(args.plot))
    if args.json:
        json.dump(result.to_dict(), sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    for line in table_lines(result):
        print(line)
    if args.plot:
        print(f"plot written to {args.plot}")
    return 0
