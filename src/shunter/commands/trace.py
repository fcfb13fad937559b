"""`shunter trace MODEL --text FILE --out trace.npz`: record the experts each token chooses."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from shunter.commands.common import DEFAULT_MODEL, DEFAULT_MODEL_HELP, print_json
from shunter.errors import ShunterError
from shunter.model.executor import Batch
from shunter.model.loader import load_model
from shunter.trace import RoutingRecorder, load_skew


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("trace", help="record routing decisions on a text", description=__doc__)
    p.add_argument("model", metavar="MODEL", nargs="?", default=DEFAULT_MODEL, help=DEFAULT_MODEL_HELP)
    p.add_argument("--text", required=True, type=Path, help="UTF-8 text file to run through the model")
    p.add_argument("--out", required=True, type=Path, help="where to write the trace (.npz)")
    p.add_argument("--window", type=int, default=256, help="tokens per forward window (default 256)")
    p.add_argument("--max-tokens", type=int, default=None, help="stop after this many tokens")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="compute dtype")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    p.set_defaults(func=run, outputs={"out": "file"})


def run(args: argparse.Namespace) -> int:
    if not args.text.is_file():
        raise ShunterError(f"{args.text}: text file not found")
    if args.max_tokens is not None and args.max_tokens < 1:
        raise ShunterError(f"--max-tokens: must be at least 1, got {args.max_tokens}")
    if args.window < 1:
        raise ShunterError(f"--window: must be at least 1, got {args.window}")
    try:
        text = args.text.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ShunterError(f"{args.text}: not UTF-8 text ({exc})") from None
    loaded = load_model(args.model, args.dtype)
    if loaded.tokenizer is None:
        raise ShunterError(f"{loaded.path}: no tokenizer.json, so it cannot read --text")
    ids = loaded.tokenizer.encode(text)
    if args.max_tokens is not None:
        ids = ids[: args.max_tokens]
    if not ids:
        raise ShunterError(f"{args.text}: no tokens in the text")
    spec = loaded.spec
    window = min(args.window, spec.max_position_embeddings)
    recorder = RoutingRecorder([i for i, moe in enumerate(spec.moe_layers) if moe], spec.num_experts)
    started = time.perf_counter()
    windows = [ids[i : i + window] for i in range(0, len(ids), window)]
    for n, chunk in enumerate(windows):
        tokens = torch.tensor([chunk])
        batch = Batch(tokens, torch.arange(len(chunk))[None], torch.ones(1, len(chunk), dtype=torch.bool), 0)
        loaded.model.forward(batch, recorder=recorder, last_only=True)
        if not args.json and sys.stderr.isatty():
            print(f"\rtracing window {n + 1}/{len(windows)}", end="", file=sys.stderr)
    trace = recorder.trace(model=spec.name, source=str(args.text))
    trace.save(args.out)
    skew = load_skew(trace)
    summary = {
        "out": str(args.out),
        "tokens": trace.num_tokens,
        "moe_layers": trace.num_layers,
        "num_experts": trace.num_experts,
        "top_k": trace.top_k,
        "max_min_load_per_layer": [float(s) for s in skew],
        "elapsed_s": time.perf_counter() - started,
    }
    if args.json:
        print_json(summary)
    else:
        if sys.stderr.isatty():
            print(file=sys.stderr)
        finite = skew[np.isfinite(skew)]
        print(
            f"wrote {args.out}: {trace.num_tokens} tokens x {trace.num_layers} MoE layers "
            f"x top-{trace.top_k}; "
            f"max/min expert load per layer: {', '.join(f'{s:.2f}' for s in skew)}"
            + ("" if len(finite) == len(skew) else " (inf: some expert got no token)")
        )
    return 0
