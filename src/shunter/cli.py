"""The `shunter` command: one entry point; each subcommand module parses its arguments and delegates.

A subcommand module exposes `register(subparsers)`, which adds its parser and sets
`func=run(args) -> int` as the default. A ShunterError anywhere becomes one line on stderr and
exit status 2; no traceback for mistakes a user can make.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
from types import ModuleType
from typing import NoReturn

from shunter.errors import FieldError, ShunterError
from shunter.files import check_output_path, check_plot_path

COMMAND_MODULES = [
    "shunter.commands.generate",
    "shunter.commands.trace",
    "shunter.commands.train",
    "shunter.commands.quantize",
    "shunter.commands.stats",
    "shunter.commands.plan",
    "shunter.commands.schedule",
    "shunter.commands.simulate",
    "shunter.commands.reproduce",
    "shunter.commands.cluster",
    "shunter.commands.bench",
    "shunter.commands.serve",
]


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, with a usage mistake reported on one line (the flag, what is wrong, where to look)
    like every other error, instead of the usage block and then the message."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="shunter",
        description="Run Mixture-of-Experts models fast where memory or network is the bottleneck.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in import_commands():
        module.register(subparsers)
    return parser


def import_commands() -> list[ModuleType]:
    """The command modules, imported with Ctrl-C held until they are in (then raised).

    A KeyboardInterrupt raised inside an extension's initialisation (torch's, numpy's) does not
    unwind cleanly: it aborted the process from pybind11, or left numpy half-imported and failed
    later with an AttributeError (measured: 2 of 12 interrupts at 0.1-0.9 s; 0 of 18 held)."""
    interrupted: list[int] = []
    try:
        previous = signal.signal(signal.SIGINT, lambda signum, _frame: interrupted.append(signum))
    except ValueError:  # not the main thread: nothing to hold
        return [importlib.import_module(name) for name in COMMAND_MODULES]
    try:
        modules = [importlib.import_module(name) for name in COMMAND_MODULES]
    finally:
        signal.signal(signal.SIGINT, previous)
    if interrupted:
        raise KeyboardInterrupt
    return modules


def flag_of(parser: argparse.ArgumentParser, args: argparse.Namespace, field: str) -> str:
    """The flag of the command that ran which sets `field` (its argparse dest), else the field."""
    for command in _parsers(parser):
        if command.get_default("func") is not args.func:
            continue
        for action in command._actions:
            if action.dest == field and action.option_strings:
                return max(action.option_strings, key=len)
    return field


def _parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """The parser and every subcommand parser below it."""
    found = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                found += _parsers(child)
    return found


def check_outputs(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The files the command will write (its `outputs` default: {dest: "file" | "figure"}) checked
    before its work, so a bad --out or --plot fails in a second, not after minutes of work."""
    for dest, kind in getattr(args, "outputs", {}).items():
        value = getattr(args, dest, None)
        if value is None:
            continue
        flag = flag_of(parser, args, dest)
        (check_plot_path if kind == "figure" else check_output_path)(value, flag)


def main(argv: list[str] | None = None) -> int:
    """The entry point. Ctrl-C at any moment, even while the commands import torch, is one line and
    status 130; a reader that stops early (`shunter plan ... | head`) ends it quietly."""
    try:
        code = _run(argv)
        sys.stdout.flush()  # inside the try: a closed pipe shows up here, not at interpreter exit
        return code
    except KeyboardInterrupt:
        print("shunter: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # as the Python docs advise for SIGPIPE: point stdout at devnull so the flush at exit is quiet
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a command killed by the closed pipe


def _run(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_outputs(parser, args)
        return int(args.func(args) or 0)
    except FieldError as exc:
        print(f"shunter: error: {exc.render(flag_of(parser, args, exc.field))}", file=sys.stderr)
        return 2
    except ShunterError as exc:
        print(f"shunter: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
