"""Pieces shared by subcommands: the MODEL argument, prompts as ids, peak memory, JSON output."""

# DEFAULT_MODEL is re-exported for the subcommands that take a MODEL argument.

from __future__ import annotations

import argparse
import json
import resource
import sys
from collections.abc import Callable
from typing import Any

from shunter.errors import ShunterError
from shunter.files import write_json
from shunter.model.loader import DEFAULT_MODEL as DEFAULT_MODEL
from shunter.model.spec import ModelSpec
from shunter.model.tokenizer import Tokenizer

DEFAULT_MODEL_HELP = (
    "a model directory (config.json + safetensors [+ tokenizer.json]) or a built-in model name "
    f"(default: {DEFAULT_MODEL})"
)


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def parse_prompt_ids(text: str, spec: ModelSpec, field: str = "--prompt-ids") -> list[int]:
    """'1,2,3' -> [1, 2, 3], each checked against the vocabulary."""
    try:
        ids = [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise ShunterError(f"{field}: expected comma-separated integers, got {text!r}") from None
    if not ids:
        raise ShunterError(f"{field}: no token ids given")
    bad = [i for i in ids if not 0 <= i < spec.vocab_size]
    if bad:
        raise ShunterError(f"{field}: token id {bad[0]} is outside the vocabulary [0, {spec.vocab_size})")
    return ids


def encode_prompt(text: str, tokenizer: Tokenizer | None, model_dir: object) -> list[int]:
    if tokenizer is None:
        raise ShunterError(f"{model_dir}: no tokenizer.json, so --prompt needs --prompt-ids instead")
    ids = tokenizer.encode(text)
    if not ids:
        raise ShunterError("--prompt: the text encodes to no tokens")
    return ids


def print_json(obj: dict[str, Any]) -> None:
    json.dump(obj, sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")


def emit_report(report: dict, args: argparse.Namespace, print_table: Callable[[dict], None]) -> int:
    """A command's result: written to --out (atomically) when given, then printed as one JSON object
    with --json, else as the command's table. Returns the exit status 0."""
    if getattr(args, "out", None):
        write_json(args.out, report)
    if args.json:
        print_json(report)
    else:
        print_table(report)
    return 0
