"""`shunter serve [MODEL]`: an OpenAI-compatible HTTP server; concurrent requests share each engine step."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from shunter.commands.common import DEFAULT_MODEL, DEFAULT_MODEL_HELP
from shunter.commands.generate import add_expert_parallel_flags, parse_batches
from shunter.errors import ShunterError
from shunter.model.loader import DTYPE_NAMES, TRACE_FILE, model_trace, resolve_model_dir
from shunter.model.spec import ModelSpec, load_spec
from shunter.offload import OffloadedModel
from shunter.offload.choose import choose_executor
from shunter.offload.device import resolve_device
from shunter.offload.planner import expert_share_from_trace
from shunter.offload.profile import machine_profile
from shunter.trace import load_trace
from shunter.units import parse_bytes

if TYPE_CHECKING:
    from shunter.serve.scheduler import BatcherOptions


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve", help="serve a model over an OpenAI-compatible HTTP API", description=__doc__
    )
    p.add_argument("model", metavar="MODEL", nargs="?", default=DEFAULT_MODEL, help=DEFAULT_MODEL_HELP)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    p.add_argument(
        "--max-sequences",
        type=int,
        default=8,
        help="sequences decoded together in one step: rows of the KV pool (default 8); more requests wait",
    )
    p.add_argument(
        "--max-queue",
        type=int,
        default=64,
        help="requests that may wait for a row (default 64); more get HTTP 429",
    )
    p.add_argument(
        "--max-context",
        type=int,
        help="prompt + generated tokens of one request (default: the model's max_position_embeddings)",
    )
    p.add_argument("--dtype", choices=list(DTYPE_NAMES), help="compute dtype (default: checkpoint's)")
    p.add_argument(
        "--memory",
        help="memory budget for weights + KV pool (e.g. 512MiB); a model larger than half of it streams its "
        "weights from disk with the offload engine",
    )
    p.add_argument(
        "--host-memory", default="0", help="host RAM for weights the device does not hold (offload)"
    )
    p.add_argument(
        "--device",
        default="cpu",
        help="where the model computes: cpu (default), cuda, cuda:N, auto; on a GPU the whole model is "
        "placed there unless --memory (the GPU's budget) is below its size",
    )
    p.add_argument(
        "--batches",
        default="auto",
        metavar="N|auto",
        help="micro-batches per step (offload); auto (default): the planner picks n each step from the "
        "number of active sequences and their context",
    )
    p.add_argument(
        "--trace",
        type=Path,
        help=f"routing trace that seeds the prefetcher (offload; default: the model's {TRACE_FILE})",
    )
    p.add_argument(
        "--name", help="model name in /v1/models and responses (default: the model directory's name)"
    )
    add_expert_parallel_flags(p, "serve")  # rank 0 serves HTTP, every rank computes its rows
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from shunter.serve.scheduler import BatcherOptions, pool_columns
    from shunter.serve.server import build_app, check_in_memory_budget, per_step_planner

    for flag in ("max_sequences", "max_queue"):
        if getattr(args, flag) < 1:
            raise ShunterError(f"--{flag.replace('_', '-')}: must be at least 1, got {getattr(args, flag)}")
    if not 0 <= args.port < 65536:
        raise ShunterError(f"--port: must lie in [0, 65535], got {args.port}")
    batches = parse_batches(args.batches)
    path = resolve_model_dir(args.model)
    spec = load_spec(path)
    max_context = args.max_context or spec.max_position_embeddings
    if not 2 <= max_context <= spec.max_position_embeddings:
        raise ShunterError(
            f"--max-context: must lie in [2, {spec.max_position_embeddings}] (the model's "
            f"max_position_embeddings), got {max_context}"
        )
    options = BatcherOptions(args.max_sequences, args.max_queue, max_context)
    if args.plan is not None or args.balance != "plan" or "WORLD_SIZE" in os.environ:
        return run_expert_parallel(args, path, spec, options)
    memory = None if args.memory is None else parse_bytes(args.memory, "--memory")
    trace = load_trace(args.trace) if args.trace else model_trace(path)
    device = resolve_device(args.device)
    choice = choose_executor(
        path, spec, dtype=args.dtype, memory_bytes=memory,
        host_memory_bytes=parse_bytes(args.host_memory, "--host-memory"), device=device,
        sequences=options.max_sequences, max_slots=pool_columns(max_context), context_tokens=max_context // 2,
        batches=batches or 1, trace=trace, trace_source=str(args.trace),
    )  # fmt: skip
    model = choice.model
    for note in choice.notes:
        print(note, file=sys.stderr)
    planner = None
    if isinstance(model, OffloadedModel):
        if batches is None:
            profile = machine_profile(spec, path, model.dtype, batch_size=1)
            share = expert_share_from_trace(trace) if trace is not None else None
            planner = per_step_planner(spec, profile, share)
        engine = f"offload engine, --memory {args.memory}"
    else:
        if memory is not None:
            check_in_memory_budget(path, spec, options, model.dtype, memory)
        engine = "in memory"
    app = build_app(model, spec, path, options, args.name, planner)
    return _serve(
        app, args, path, options, engine, model.close if isinstance(model, OffloadedModel) else None
    )


def _serve(app, args: argparse.Namespace, path: Path, options: BatcherOptions, engine: str, close) -> int:
    """Announce the server on stderr, run it until it stops, then `close` (if any) whatever ended it."""
    print(
        f"shunter serve: {path.name} ({engine}) on http://{args.host}:{args.port}/v1, "
        f"up to {options.max_sequences} sequences per step, {options.max_queue} requests may wait",
        file=sys.stderr,
    )
    import uvicorn

    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        if close is not None:
            close()
    return 0


def run_expert_parallel(
    args: argparse.Namespace, path: Path, spec: ModelSpec, options: BatcherOptions
) -> int:
    """One rank of `torchrun -m shunter serve`: every MoE layer expert-parallel under --plan
    (contiguous without), each rank computing the pool rows it owns (serve/expert_parallel.py);
    rank 0 serves HTTP. Every rank holds its weights in memory."""
    from shunter.parallel.inference import (
        LiveOptions,
        load_expert_parallel_model,
        placements_of,
        port_bandwidths,
    )
    from shunter.parallel.runtime import init_from_environment, run_rank
    from shunter.plan.document import load_plan
    from shunter.serve.expert_parallel import ExpertParallelForwards
    from shunter.serve.scheduler import pool_columns
    from shunter.serve.server import build_app

    for flag, default in (("memory", None), ("host_memory", "0"), ("device", "cpu"), ("batches", "auto")):
        if getattr(args, flag) != default:
            raise ShunterError(f"--{flag.replace('_', '-')} is for the offload engine; expert parallelism "
                               "holds every rank's weights in memory")  # fmt: skip
    plan = load_plan(args.plan) if args.plan is not None else None  # bad plans fail before the group
    if plan is not None and plan.mode == "colocated":
        raise ShunterError(f"{plan.source}: a colocated plan places two models; `shunter serve` serves one")
    if plan is not None and os.environ.get("WORLD_SIZE", "").isdigit():
        placements_of(spec, int(os.environ["WORLD_SIZE"]), plan, str(path))
    trace = load_trace(args.trace) if args.trace else model_trace(path)

    def main() -> int:
        rank, world = init_from_environment(args.timeout)
        dtype = DTYPE_NAMES[args.dtype] if args.dtype else spec.torch_dtype
        ep = load_expert_parallel_model(
            path, dtype, placements_of(spec, world, plan, str(path)), strategy=args.strategy,
            bandwidth_bytes_s=port_bandwidths(plan, world), balance=args.balance,
            live=LiveOptions(profile=trace),
        )  # fmt: skip
        forwards = ExpertParallelForwards(ep, options.max_sequences, pool_columns(options.max_context))
        if rank != 0:
            forwards.follow()
            return 0
        app = build_app(ep.model, spec, path, options, args.name, forwards=forwards)
        placement = str(args.plan) if args.plan else "contiguous experts"
        engine = f"expert-parallel on {world} ranks, {placement}, balance {args.balance}"
        return _serve(app, args, path, options, engine, forwards.close)  # close: every follower stops

    return run_rank(main)
