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
from shunter.errors import ShunterError
from shunter.model.loader import load_model, resolve_model_dir
from shunter.model.quality import QualityReport, builtin_heldout_stream, compare_quality
from shunter.model.quant import DEFAULT_GROUP_SIZE
from shunter.model.quantize_checkpoint import OPTIONAL_MODULES, quantize_checkpoint, stderr_progress
from shunter.offload.device import resolve_device
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
    p.add_argument(
        "--eval-tokens",
        type=int,
        default=0,
        help="then compare OUT with MODEL on this many tokens of the built-in model's held-out text: "
        "bits per byte of each, KL divergence from MODEL's logits (default 0: no comparison)",
    )
    p.add_argument(
        "--device",
        default="cpu",
        help="where the groups are fitted: cpu (default), cuda, cuda:N or auto (a GPU when usable)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    include = tuple(m.strip() for m in args.include.split(",") if m.strip())
    model_dir = resolve_model_dir(args.model)
    summary = quantize_checkpoint(
        model_dir,
        args.out,
        args.bits,
        args.group_size,
        include,
        args.overwrite,
        None if args.quiet else stderr_progress,
        resolve_device(args.device),
    )
    report = dataclasses.asdict(summary)
    if args.eval_tokens > 0:
        report["quality"] = dataclasses.asdict(evaluate(model_dir, summary.out_dir, args.eval_tokens))
    if args.json:
        print_json(report)
        return 0
    print(
        f"{summary.out_dir}: {summary.quantized_tensors} weights at {summary.bits} bits "
        f"(group {summary.group_size}; {', '.join(summary.modules)}): "
        f"{format_bytes(summary.quantized_bytes_before)} -> {format_bytes(summary.quantized_bytes_after)}; "
        f"model {format_bytes(summary.bytes_before)} -> {format_bytes(summary.bytes_after)}"
    )
    quality = report.get("quality")
    if quality is not None:
        print(
            f"held-out {quality['tokens_predicted']} tokens: bits/byte "
            f"{quality['reference_bits_per_byte']:.4f} -> {quality['candidate_bits_per_byte']:.4f}, "
            f"KL {quality['kl_nats_per_token']:.5f} nats/token, "
            f"top-1 agreement {quality['top1_agreement']:.3f}"
        )
    return 0


def evaluate(model_dir: Path, quantized_dir: str, tokens: int) -> QualityReport:
    """The quantised model against its source on the built-in model's held-out text."""
    reference = load_model(model_dir)
    if reference.tokenizer is None:
        raise ShunterError(f"{model_dir}: --eval-tokens needs the model's tokenizer.json")
    stream = builtin_heldout_stream(reference.tokenizer, tokens)
    return compare_quality(reference.model, load_model(quantized_dir).model, stream, reference.tokenizer)
