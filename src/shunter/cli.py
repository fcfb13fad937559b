"""The `shunter` command: one entry point; each subcommand module parses its arguments and delegates.

A subcommand module exposes `register(subparsers)`, which adds its parser and sets
`func=run(args) -> int` as the default. A ShunterError anywhere becomes one line on stderr and
exit status 2; no traceback for mistakes a user can make.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from shunter.errors import ShunterError

COMMAND_MODULES = [
    "shunter.commands.generate",
    "shunter.commands.trace",
    "shunter.commands.train",
    "shunter.commands.stats",
    "shunter.commands.plan",
    "shunter.commands.schedule",
    "shunter.commands.simulate",
    "shunter.commands.reproduce",
    "shunter.commands.cluster",
    "shunter.commands.bench",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shunter",
        description="Run Mixture-of-Experts models fast where memory or network is the bottleneck.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ShunterError as exc:
        print(f"shunter: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("shunter: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
