"""`shunter quantize MODEL --bits 4|8 --out DIR`: write a quantised copy of a checkpoint.

Routed experts are always quantised; `--include shared,attention,lm_head` adds shared experts and
dense MLPs, attention projections, the LM head. 8 bits: symmetric, one fp16 scale per group
(Q8_0-like); 4 bits: asymmetric, an fp16 scale and min per group (Q4_1-like). Groups run along
each weight's input dimension. The layout is in docs/quantization.md; every engine reads it.
DIR is replaced only if it is empty or a model Shunter wrote; --overwrite replaces anything.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from shunter.commands.common import DEFAULT_MODEL_HELP, print_json
from shunter.model.loader import resolve_model_dir
from shunter.model.quant import DEFAULT_GROUP_SIZE
from shunter.model.quantize_checkpoint import OPTIONAL_MODULES, quantize_checkpoint, stderr_progress
from shunter.units import format_bytes


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "quantize",
        help="write a 4- or 8-bit weight-quantised copy of a model",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", metavar="MODEL", help=DEFAULT_MODEL_HELP)
    p.add_argument("--bits", type=int, required=True, help="4 or 8")
    p.add_argument(
        "--group-size",
        type=int,
        default=DEFAULT_GROUP_SIZE,
        help=f"input columns sharing one scale (default {DEFAULT_GROUP_SIZE})",
    )
    p.add_argument(
        "--include",
        default="",
        help=f"comma-separated modules to quantise beside the routed experts: {', '.join(OPTIONAL_MODULES)}",
    )
    p.add_argument("--out", required=True, type=Path, help="output model directory (HF layout)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace OUT even if it holds files Shunter did not write (default: refuse)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    include = tuple(m.strip() for m in args.include.split(",") if m.strip())
    summary = quantize_checkpoint(
        resolve_model_dir(args.model),
        args.out,
        args.bits,
        args.group_size,
        include,
        args.overwrite,
        None if args.quiet else stderr_progress,
    )
    if args.json:
        print_json(dataclasses.asdict(summary))
        return 0
    print(
        f"{summary.out_dir}: {summary.quantized_tensors} weights at {summary.bits} bits "
        f"(group {summary.group_size}; {', '.join(summary.modules)}): "
        f"{format_bytes(summary.quantized_bytes_before)} -> {format_bytes(summary.quantized_bytes_after)}; "
        f"model {format_bytes(summary.bytes_before)} -> {format_bytes(summary.bytes_after)}"
    )
    return 0
