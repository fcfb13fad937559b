"""`shunter bench a2a --hosts N --bandwidth ... [--trace T.npz] [--plan P.json]`: measure each MoE
layer's dispatch + combine on an emulated cluster three ways (all_to_all_single, Shunter's
schedule, random order) beside the lower bound and the simulator's prediction. Needs root.

`shunter bench ep --hosts N --bandwidth ...`: per-batch time of the MoE layers over a trace's batch
stream under static, EPLB-style, Lina-live and ideal placements, and two colocated models against
each alone on half the hosts, beside the simulator (shunter.bench.ep). Needs root.

`shunter bench offload MODEL --memory X`: decode tok/s of the offload engine's ablation ladder,
transformers + accelerate disk offload, the planner's prediction and the in-memory executor, each
in its own process in a memory cgroup capped at X (shunter.bench.offload). Needs root."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import tempfile
from pathlib import Path

from shunter.bench import offload as offload_bench
from shunter.bench import train as train_bench
from shunter.bench.a2a import DEFAULT_ROW_BYTES
from shunter.bench.report import print_offload_table
from shunter.bench.workers import PROMPT_TOKENS
from shunter.commands.cluster import add_congestion_control_argument
from shunter.commands.common import DEFAULT_MODEL, DEFAULT_MODEL_HELP, emit_report
from shunter.errors import ShunterError
from shunter.model.checkpoint import Checkpoint
from shunter.model.loader import TRACE_FILE, default_trace_path, model_trace, resolve_model_dir
from shunter.model.spec import load_spec
from shunter.network.transport import STRATEGIES
from shunter.offload.planner import MAX_PLANNED_BATCHES
from shunter.parallel.cluster import (
    DEFAULT_PORT,
    EmulatedCluster,
    check_environment,
    parse_host_bandwidths,
)
from shunter.parallel.launch import run_on_cluster
from shunter.plan.document import check_trace_against, load_plan
from shunter.trace.routing_trace import load_trace
from shunter.units import flag_type, format_bytes, parse_bytes, parse_number

# what `shunter serve` (Python, torch, the ASGI stack) takes beside its --memory under a cgroup cap
DEFAULT_SERVE_RUNTIME_RESERVE_BYTES = 400 * 2**20


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("bench", help="benchmarks on this machine", description=__doc__)
    kinds = parser.add_subparsers(dest="bench_command", metavar="BENCHMARK", required=True)
    a2a = kinds.add_parser(
        "a2a",
        help="all-to-all strategies on an emulated cluster beside the bound and the simulator (root)",
        description="Run one rank per emulated host (network namespaces, each port shaped with tc) "
        "and time every MoE layer's dispatch + combine with all_to_all_single, Shunter's schedule "
        "and random order; median of --reps after --warmup, beside the lower bound and the "
        "simulator's prediction on the measured link efficiency and latency.",
    )
    a2a.add_argument("--hosts", type=int, required=True, help="number of emulated hosts (ranks)")
    a2a.add_argument(
        "--bandwidth",
        required=True,
        help="port rate of every host, or one per host "
        "(e.g. 400Mbit/s or 400Mbit/s,320Mbit/s,200Mbit/s,160Mbit/s)",
    )
    a2a.add_argument("--trace", default=None, help="routing trace .npz (default: the built-in model's)")
    a2a.add_argument(
        "--plan", default=None, help="a plan from `shunter plan --out`: its placement (slots) per layer"
    )
    a2a.add_argument("--layers", type=int, default=2, help="MoE layers of the trace to run (default 2)")
    a2a.add_argument("--tokens", type=int, default=2048, help="tokens per layer (default 2048)")
    a2a.add_argument(
        "--row-bytes",
        type=int,
        default=DEFAULT_ROW_BYTES,
        help=f"bytes of one token on the wire (default {DEFAULT_ROW_BYTES}: hidden 4096 in bf16)",
    )
    a2a.add_argument("--reps", type=int, default=5, help="timed repetitions per strategy (default 5)")
    a2a.add_argument("--warmup", type=int, default=1, help="untimed repetitions first (default 1)")
    a2a.add_argument(
        "--probe-bytes",
        type=int,
        default=4 << 20,
        help="bytes per flow of the calibration probes (default 4 MiB)",
    )
    a2a.add_argument(
        "--max-lanes",
        type=int,
        default=16,
        help="lanes per port Shunter's schedule may use on mixed ports (default 16; 1: plain matchings)",
    )
    add_cluster_run_arguments(a2a, timeout_s=120.0)
    a2a.set_defaults(func=run_a2a, outputs={"out": "file"})
    _register_train(kinds)

    ep = kinds.add_parser(
        "ep",
        help="expert-parallel per-batch time: static, EPLB-style, Lina live, ideal; colocation (root)",
        description="Run one rank per emulated host and time a stream of batches, routed as the trace "
        "routes them, through the MoE layers (all-gather of counts, dispatch, experts, combine) under "
        "static contiguous placement, the EPLB-style plan, Lina's live replication and an ideal "
        "balanced gate (p50/p95 per batch beside the simulator's prediction), then two colocated "
        "models against each alone on half the hosts (shunter.bench.ep).",
    )
    ep.add_argument("--hosts", type=int, required=True, help="number of emulated hosts (ranks)")
    ep.add_argument("--bandwidth", required=True, help="port rate of every host, or one per host")
    ep.add_argument("--trace", default=None, help="routing trace .npz (default: the built-in model's)")
    ep.add_argument("--layers", type=int, default=4, help="MoE layers of the trace to run (default 4)")
    ep.add_argument("--batch-tokens", type=int, default=1024, help="tokens per batch (default 1024)")
    ep.add_argument("--batches", type=int, default=20, help="timed batches per policy (default 20)")
    ep.add_argument("--warmup", type=int, default=2, help="untimed batches per policy first (default 2)")
    ep.add_argument(
        "--profile-tokens",
        type=int,
        default=16384,
        help="trace tokens that profile Lina's estimator and the EPLB-style plan (default 16384)",
    )
    ep.add_argument("--hidden", type=int, default=256, help="expert hidden size (default 256)")
    ep.add_argument("--intermediate", type=int, default=512, help="expert intermediate size (default 512)")
    ep.add_argument(
        "--strategy", default="all_to_all", choices=STRATEGIES, help="the exchange (default all_to_all)"
    )
    ep.add_argument("--no-colocation", action="store_true", help="skip the colocation run")
    add_cluster_run_arguments(ep, timeout_s=120.0)
    ep.add_argument(
        "--plot",
        metavar="FILE",
        default=None,
        help="draw each policy's measured and predicted time per batch (.png, .pdf, .svg)",
    )
    ep.set_defaults(func=run_ep, outputs={"out": "file", "plot": "figure"})

    offload = kinds.add_parser(
        "offload",
        help="offloaded decode under a memory cap: Shunter's ladder vs transformers + accelerate (root)",
        description="Run every contender in its own process inside a fresh memory cgroup capped at "
        "--memory (the cap counts the page cache), page cache dropped first: transformers + "
        "accelerate disk offload, the offload engine's ablation ladder (simple, multi-batch, "
        "hot-prefetch, reorder = Shunter), the planner's prediction and the in-memory executor "
        "uncapped; decode tok/s, median of --reps after --warmup, with bytes read and peak memory.",
    )
    offload.add_argument("model", metavar="MODEL", help="a checkpoint directory (config.json + safetensors)")
    offload.add_argument(
        "--memory",
        required=True,
        help="cap of every contender's memory cgroup: weights + KV cache + runtime + page cache "
        "(e.g. 1.5GiB)",
    )
    offload.add_argument(
        "--runtime-reserve",
        default=f"{offload_bench.DEFAULT_RUNTIME_RESERVE_BYTES // 2**20}MiB",
        help="of --memory, what the Python/torch runtime and its libraries' page cache get; the rest "
        "is the weight budget of both the engine and accelerate (default "
        f"{offload_bench.DEFAULT_RUNTIME_RESERVE_BYTES // 2**20}MiB)",
    )
    offload.add_argument(
        "--sequences", default="1,8,64", help="sequences in flight, one table each (default 1,8,64)"
    )
    offload.add_argument(
        "--new-tokens", type=int, default=8, help="tokens generated per sequence (default 8; at least 2)"
    )
    offload.add_argument("--reps", type=int, default=5, help="timed repetitions per contender (default 5)")
    offload.add_argument("--warmup", type=int, default=1, help="untimed repetitions first (default 1)")
    offload.add_argument(
        "--accelerate-batches",
        default="1,8,64",
        help="batches to find accelerate's best at (default 1,8,64)",
    )
    offload.add_argument(
        "--sweep",
        default="1,2,4,8,16,32,64",
        help="sequences in flight for the reorder rung at one sequence per micro-batch, beside the "
        "planner's n (default 1,2,4,8,16,32,64)",
    )
    offload.add_argument(
        "--run-timeout",
        type=flag_type(parse_number, minimum=0),
        default=offload_bench.DEFAULT_RUN_TIMEOUT_S,
        help="seconds one run may take before it is killed and its contender reported as timed out, "
        f"not run again (default {offload_bench.DEFAULT_RUN_TIMEOUT_S:g}; 0: no limit)",
    )
    offload.add_argument(
        "--work-dir",
        default=None,
        help="where accelerate's offload folder goes (default: MODEL.shunter-bench/ next to the model)",
    )
    offload.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    offload.add_argument("--out", default=None, help="also write the JSON result to this file")
    offload.set_defaults(func=run_offload, outputs={"out": "file"})

    decode = kinds.add_parser(
        "decode",
        help="decode tok/s of Shunter and llama.cpp at the same precision, in memory and under a cap (root)",
        description="For each --precision NAME=CHECKPOINT,GGUF and each number of sequences: Shunter "
        "(in memory, or the offload engine when the checkpoint exceeds the cap less --runtime-reserve) "
        "and llama.cpp's llama-batched-bench on the same weights, every sequence its own random 16-token "
        "prompt, in memory and in a fresh memory cgroup at --cap with the page cache dropped; runs "
        "interleaved round by round, median of --reps after --warmup.",
    )
    decode.add_argument(
        "--precision",
        action="append",
        required=True,
        metavar="NAME=CHECKPOINT,GGUF",
        help="a precision to compare, e.g. bf16=model-bf16,model.bf16.gguf (repeatable)",
    )
    decode.add_argument("--llama-batched-bench", required=True, metavar="PATH", help="llama.cpp's binary")
    decode.add_argument("--cap", required=True, help="the capped runs' memory cgroup, page cache included")
    decode.add_argument(
        "--runtime-reserve",
        default="400MiB",
        help="of --cap, what Shunter's runtime gets; the rest is its weight budget (default 400MiB)",
    )
    decode.add_argument("--sequences", default="1,8,64", help="sequences in flight (default 1,8,64)")
    decode.add_argument("--new-tokens", type=int, default=8, help="tokens per sequence (default 8)")
    decode.add_argument("--threads", type=int, default=2, help="llama.cpp's -t and -tb (default 2)")
    decode.add_argument("--reps", type=int, default=5, help="timed rounds (default 5)")
    decode.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    decode.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    decode.add_argument("--out", default=None, help="also write the JSON result to this file")
    decode.set_defaults(func=run_decode, outputs={"out": "file"})

    serve = kinds.add_parser(
        "serve",
        help="streaming OpenAI clients against shunter serve, one-at-a-time and llama-server at rising "
        "concurrency, optionally under a memory cap (root)",
        description="At each concurrency level C, C streaming OpenAI clients send completions of a fixed "
        "length (ignore_eos) with independent prompts (token ids from the built-in model's held-out text); "
        "output tok/s, time to first token and inter-token latency (p50, p95), median of --reps after "
        "--warmup rounds, contenders interleaved round by round. Every server is started afresh per level, "
        "with --cap in a fresh memory cgroup of that size, page cache dropped first. Contenders (--runs): "
        "shunter (shunter serve --max-sequences C), one-at-a-time (--max-sequences 1), llama-server "
        "(llama.cpp's server with -np C; --llama-server, --gguf), peer (--peer-url), generate (shunter "
        "generate on one prompt, at level 1).",
    )
    serve.add_argument("model", metavar="MODEL", nargs="?", default=DEFAULT_MODEL, help=DEFAULT_MODEL_HELP)
    serve.add_argument("--concurrency", default="1,4,16,64", help="clients per level (default 1,4,16,64)")
    serve.add_argument("--max-tokens", type=int, default=32, help="tokens per completion (default 32)")
    serve.add_argument(
        "--prompt-tokens", type=int, default=32, help="held-out token ids per prompt (default 32)"
    )
    serve.add_argument(
        "--requests-per-client", type=int, default=2, help="completions each client sends in turn (default 2)"
    )
    serve.add_argument("--reps", type=int, default=1, help="timed rounds per level (default 1)")
    serve.add_argument("--warmup", type=int, default=0, help="untimed rounds first, per level (default 0)")
    serve.add_argument(
        "--max-run-seconds",
        type=flag_type(parse_number, above=0),
        help="stop a run here; the tokens streamed so far count (a one-at-a-time server at 64 clients "
        "would otherwise take many minutes a run)",
    )
    serve.add_argument(
        "--max-sequences", type=int, help="shunter serve's --max-sequences (default: the level's concurrency)"
    )
    serve.add_argument(
        "--cap",
        help="memory cgroup of every server and generate process, page cache included (e.g. 734MB; root)",
    )
    serve.add_argument(
        "--runtime-reserve",
        default=f"{DEFAULT_SERVE_RUNTIME_RESERVE_BYTES // 2**20}MiB",
        help="with --cap and no --memory: of the cap, what the Python/torch/server runtime gets; shunter's "
        f"--memory is the rest (default {DEFAULT_SERVE_RUNTIME_RESERVE_BYTES // 2**20}MiB)",
    )
    serve.add_argument("--memory", help="shunter serve's and generate's --memory (default: cap - reserve)")
    serve.add_argument("--llama-server", metavar="PATH", help="llama.cpp's llama-server binary")
    serve.add_argument("--gguf", metavar="FILE", help="the model converted to GGUF, for llama-server")
    serve.add_argument("--threads", type=int, default=2, help="llama-server's -t and -tb (default 2)")
    serve.add_argument("--peer-url", help="another OpenAI server's base URL, e.g. http://127.0.0.1:8080/v1")
    serve.add_argument(
        "--runs",
        help="contenders, in order: shunter, one-at-a-time, llama-server, peer, generate (default: shunter, "
        "llama-server with --llama-server, peer with --peer-url)",
    )
    serve.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    serve.add_argument("--out", default=None, help="also write the JSON result to this file")
    serve.add_argument(
        "--plot", metavar="FILE", help="draw output tok/s against concurrency (.png, .pdf, .svg)"
    )
    serve.set_defaults(func=run_serve, outputs={"out": "file", "plot": "figure"})


def add_cluster_run_arguments(parser: argparse.ArgumentParser, timeout_s: float) -> None:
    """What every benchmark running ranks on the emulated cluster takes: the congestion control,
    the collective timeout, the rendezvous port, --json and --out."""
    add_congestion_control_argument(parser)
    parser.add_argument(
        "--timeout",
        type=flag_type(parse_number, above=0),
        default=timeout_s,
        help="seconds any collective may wait",
    )
    parser.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help=f"rendezvous port (default {DEFAULT_PORT})"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--out", default=None, help="also write the JSON result to this file")


def serve_config(args: argparse.Namespace):
    """`shunter bench serve`'s options checked; ShunterError naming the option for anything wrong."""
    from shunter.bench import serve as serve_bench

    concurrency = tuple(parse_sequence_list(args.concurrency, "--concurrency"))
    for flag in ("max_tokens", "prompt_tokens", "requests_per_client", "reps", "threads"):
        if getattr(args, flag) < 1:
            raise ShunterError(f"--{flag.replace('_', '-')}: must be at least 1, got {getattr(args, flag)}")
    if args.warmup < 0:
        raise ShunterError(f"--warmup: must be at least 0, got {args.warmup}")
    default_runs = ["shunter"] + ["llama-server"] * bool(args.llama_server) + ["peer"] * bool(args.peer_url)
    runs = [r.strip() for r in args.runs.split(",") if r.strip()] if args.runs else default_runs
    unknown = [r for r in runs if r not in serve_bench.CONTENDERS]
    if unknown or not runs:
        raise ShunterError(f"--runs: expected some of {', '.join(serve_bench.CONTENDERS)}; got {args.runs!r}")
    if "peer" in runs and not args.peer_url:
        raise ShunterError("--runs peer needs --peer-url")
    if "llama-server" in runs:
        if not args.llama_server or not args.gguf:
            raise ShunterError("--runs llama-server needs --llama-server PATH and --gguf FILE")
        if not os.access(args.llama_server, os.X_OK) or Path(args.llama_server).is_dir():
            raise ShunterError(f"--llama-server {args.llama_server}: not an executable file")
        if not Path(args.gguf).is_file():
            raise ShunterError(f"--gguf {args.gguf}: no such file")
    if "generate" in runs and 1 not in concurrency:
        raise ShunterError("--runs generate is measured at concurrency 1: add 1 to --concurrency")
    cap = parse_bytes(args.cap, "--cap") if args.cap else None
    if cap is not None:
        serve_bench.check_cap_environment()
    memory = args.memory
    if cap is not None and memory is None:
        reserve = parse_bytes(args.runtime_reserve, "--runtime-reserve")
        if cap <= reserve:
            raise ShunterError(
                f"--cap {format_bytes(cap)} is not above --runtime-reserve {format_bytes(reserve)}: nothing "
                "would be left for shunter's --memory"
            )
        memory = str(cap - reserve)
    elif memory is not None:
        parse_bytes(memory, "--memory")
    return serve_bench.ServeBenchConfig(
        concurrency=concurrency, max_tokens=args.max_tokens, prompt_tokens=args.prompt_tokens,
        requests_per_client=args.requests_per_client, contenders=tuple(dict.fromkeys(runs)),
        reps=args.reps, warmup=args.warmup, max_run_s=args.max_run_seconds, model=args.model,
        memory=memory, max_sequences=args.max_sequences, cap_bytes=cap, peer_url=args.peer_url,
        llama_server=args.llama_server, gguf=args.gguf, threads=args.threads,
    )  # fmt: skip


def run_serve(args: argparse.Namespace) -> int:
    from shunter.bench import serve as serve_bench

    report = serve_bench.run_benchmark(serve_config(args), progress=sys.stderr)
    if args.plot:
        serve_bench.plot_throughput(report, Path(args.plot))

    def print_table(report: dict) -> None:
        serve_bench.print_serve_table(report)
        if args.plot:
            print(f"plot written to {args.plot}")

    return emit_report(report, args, print_table)


def run_a2a(args: argparse.Namespace) -> int:
    if args.hosts < 2:
        raise ShunterError(f"--hosts: an all-to-all needs at least 2 hosts, got {args.hosts}")
    if args.reps < 1 or args.warmup < 0 or args.layers < 1 or args.tokens < 1 or args.max_lanes < 1:
        raise ShunterError(
            "--reps, --layers, --tokens and --max-lanes must be at least 1, --warmup at least 0"
        )
    bandwidth = parse_host_bandwidths(args.bandwidth, args.hosts)
    trace_path = Path(args.trace) if args.trace else default_trace_path()
    trace = load_trace(trace_path)
    placements = _plan_placements(args.plan, trace, args.hosts, trace_path) if args.plan else None
    check_environment()

    with tempfile.TemporaryDirectory(prefix="shunter-a2a-") as scratch:
        result_path = Path(scratch) / "result.json"
        command = [
            sys.executable, "-m", "shunter.bench.a2a",
            "--trace", str(trace_path.resolve()),
            "--layers", str(args.layers), "--tokens", str(args.tokens), "--row-bytes", str(args.row_bytes),
            "--reps", str(args.reps), "--warmup", str(args.warmup), "--timeout", str(args.timeout),
            "--probe-bytes", str(args.probe_bytes), "--max-lanes", str(args.max_lanes),
            "--out", str(result_path),
        ]  # fmt: skip
        if placements is not None:
            placement_path = Path(scratch) / "placement.json"
            placement_path.write_text(json.dumps(placements))
            command += ["--placement", str(placement_path)]
        # c10d warns that namespaces have no hostnames; nothing a user can act on.
        os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
        with EmulatedCluster(args.hosts, bandwidth, congestion_control=args.congestion_control) as cluster:
            # Rank output (progress, errors) goes to stderr so that --json stdout stays one object.
            status = run_on_cluster(cluster, command, port=args.port, out=sys.stderr, err=sys.stderr)
        if status != 0:
            raise ShunterError(f"the benchmark ranks failed (exit status {status}); their output is above")
        report = json.loads(result_path.read_text())
    report["congestion_control"] = args.congestion_control
    return emit_report(report, args, print_a2a_table)


def parse_sequence_list(text: str, field: str) -> list[int]:
    """'1,8,64' -> [1, 8, 64]: positive integers, duplicates dropped, order kept."""
    try:
        values = [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise ShunterError(f"{field}: expected comma-separated positive integers, got {text!r}") from None
    if not values:
        raise ShunterError(f"{field}: no numbers given")
    bad = [v for v in values if v < 1]
    if bad:
        raise ShunterError(f"{field}: every number must be at least 1, got {bad[0]}")
    return list(dict.fromkeys(values))


def offload_config(args: argparse.Namespace) -> offload_bench.BenchConfig:
    """The options checked and read; ShunterError naming the option for anything wrong."""
    if args.new_tokens < 2:
        raise ShunterError(f"--new-tokens: the decode rate needs at least 2, got {args.new_tokens}")
    if args.reps < 1 or args.warmup < 0:
        raise ShunterError("--reps must be at least 1 and --warmup at least 0")
    if not (args.run_timeout >= 0 and math.isfinite(args.run_timeout)):
        raise ShunterError(f"--run-timeout: expected seconds >= 0 (0: no limit), got {args.run_timeout:g}")
    sequences = parse_sequence_list(args.sequences, "--sequences")
    accelerate_batches = parse_sequence_list(args.accelerate_batches, "--accelerate-batches")
    sweep = parse_sequence_list(args.sweep, "--sweep")
    cap = parse_bytes(args.memory, "--memory")
    reserve = parse_bytes(args.runtime_reserve, "--runtime-reserve")
    path = resolve_model_dir(args.model)
    spec = load_spec(path)
    trace = model_trace(path)  # the planner's expert shares come from it: it must fit the model
    if trace is not None:
        trace.check_fits(spec, str(path / TRACE_FILE))
    model_bytes = offload_bench.checkpoint_bytes(Checkpoint(path))
    if cap <= reserve:
        raise ShunterError(
            f"--memory {format_bytes(cap)} is not above --runtime-reserve {format_bytes(reserve)}: "
            "nothing would be left for the weights"
        )
    if cap - reserve >= model_bytes:
        raise ShunterError(
            f"--memory {format_bytes(cap)} leaves {format_bytes(cap - reserve)} for weights after "
            f"--runtime-reserve, more than the whole model ({format_bytes(model_bytes)}): nothing would "
            f"stream from disk; give less than {format_bytes(model_bytes + reserve)}"
        )
    if PROMPT_TOKENS + args.new_tokens > spec.max_position_embeddings:
        raise ShunterError(
            f"--new-tokens: {PROMPT_TOKENS}-token prompts + {args.new_tokens} exceed the "
            f"model's max_position_embeddings ({spec.max_position_embeddings})"
        )
    missing = [name for name in ("transformers", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise ShunterError(f"the accelerate contender needs {' and '.join(missing)}: pip install -e '.[dev]'")
    work_dir = Path(args.work_dir) if args.work_dir else offload_bench.default_work_dir(path)
    try:
        work_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ShunterError(f"--work-dir {work_dir}: cannot create it: {exc.strerror}") from None
    return offload_bench.BenchConfig(
        model_dir=path,
        cap_bytes=cap,
        runtime_reserve_bytes=reserve,
        sequences=sequences,
        accelerate_batches=accelerate_batches,
        sweep=sweep,
        new_tokens=args.new_tokens,
        reps=args.reps,
        warmup=args.warmup,
        work_dir=work_dir,
        max_batches=MAX_PLANNED_BATCHES,
        run_timeout_s=args.run_timeout or None,
    )


def decode_config(args: argparse.Namespace):
    """`shunter bench decode`'s options checked; ShunterError naming the option for anything wrong."""
    from shunter.bench import decode as decode_bench

    if args.new_tokens < 2:
        raise ShunterError(f"--new-tokens: the decode rate needs at least 2, got {args.new_tokens}")
    if args.reps < 1 or args.warmup < 0 or args.threads < 1:
        raise ShunterError("--reps and --threads must be at least 1 and --warmup at least 0")
    binary = Path(args.llama_batched_bench)
    if not (binary.is_file() and os.access(binary, os.X_OK)):
        raise ShunterError(f"--llama-batched-bench {binary}: not an executable file")
    precisions = []
    for text in args.precision:
        name, _, paths = text.partition("=")
        checkpoint, _, gguf = paths.partition(",")
        if not (name and checkpoint and gguf):
            raise ShunterError(f"--precision {text!r}: expected NAME=CHECKPOINT,GGUF")
        if not Path(gguf).is_file():
            raise ShunterError(f"--precision {name}: {gguf} is not a file")
        load_spec(resolve_model_dir(checkpoint))  # a clear error for a bad checkpoint, before any run
        precisions.append(decode_bench.Precision(name, resolve_model_dir(checkpoint), Path(gguf)))
    cap, reserve = parse_bytes(args.cap, "--cap"), parse_bytes(args.runtime_reserve, "--runtime-reserve")
    if cap <= reserve:
        raise ShunterError(
            f"--cap {format_bytes(cap)} is not above --runtime-reserve {format_bytes(reserve)}"
        )
    return decode_bench.DecodeBenchConfig(
        precisions=precisions,
        sequences=parse_sequence_list(args.sequences, "--sequences"),
        cap_bytes=cap,
        runtime_reserve_bytes=reserve,
        llama_batched_bench=binary,
        threads=args.threads,
        new_tokens=args.new_tokens,
        reps=args.reps,
        warmup=args.warmup,
    )


def run_decode(args: argparse.Namespace) -> int:
    from shunter.bench import decode as decode_bench

    report = decode_bench.run_benchmark(decode_config(args), progress=sys.stderr)
    return emit_report(report, args, decode_bench.print_decode_table)


def run_offload(args: argparse.Namespace) -> int:
    config = offload_config(args)
    report = offload_bench.run_benchmark(config, progress=sys.stderr)
    return emit_report(report, args, print_offload_table)


def run_ep(args: argparse.Namespace) -> int:
    if args.hosts < 2:
        raise ShunterError(f"--hosts: expert parallelism needs at least 2 hosts, got {args.hosts}")
    for flag in ("layers", "batch_tokens", "batches", "profile_tokens", "hidden", "intermediate"):
        if getattr(args, flag) < 1:
            raise ShunterError(f"--{flag.replace('_', '-')}: must be at least 1, got {getattr(args, flag)}")
    if args.warmup < 0:
        raise ShunterError(f"--warmup: must be at least 0, got {args.warmup}")
    bandwidth = parse_host_bandwidths(args.bandwidth, args.hosts)
    trace_path = Path(args.trace) if args.trace else default_trace_path()
    trace = load_trace(trace_path)
    needed = args.profile_tokens + (args.warmup + args.batches) * args.batch_tokens
    if trace.num_tokens < needed:
        raise ShunterError(
            f"{trace_path}: {trace.num_tokens} tokens, the run needs {needed} (--profile-tokens + "
            "(--warmup + --batches) x --batch-tokens)"
        )
    check_environment()
    with tempfile.TemporaryDirectory(prefix="shunter-ep-") as scratch:
        result_path = Path(scratch) / "result.json"
        command = [
            sys.executable, "-m", "shunter.bench.ep", "--trace", str(trace_path.resolve()),
            "--layers", str(args.layers), "--batch-tokens", str(args.batch_tokens),
            "--batches", str(args.batches), "--warmup", str(args.warmup),
            "--profile-tokens", str(args.profile_tokens), "--hidden", str(args.hidden),
            "--intermediate", str(args.intermediate), "--strategy", args.strategy,
            "--timeout", str(args.timeout), "--out", str(result_path),
        ]  # fmt: skip
        if args.no_colocation:
            command.append("--no-colocation")
        os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
        with EmulatedCluster(args.hosts, bandwidth, congestion_control=args.congestion_control) as cluster:
            status = run_on_cluster(cluster, command, port=args.port, out=sys.stderr, err=sys.stderr)
        if status != 0:
            raise ShunterError(f"the benchmark ranks failed (exit status {status}); their output is above")
        report = json.loads(result_path.read_text())
    report["congestion_control"] = args.congestion_control
    if args.plot:
        from shunter.bench.ep import plot_per_batch  # torch.distributed: only when drawing

        plot_per_batch(report, Path(args.plot))
    return emit_report(report, args, print_ep_table)


def print_ep_table(report: dict) -> None:
    rates = ", ".join(f"{b * 8 / 1e6:g}" for b in report["bandwidth_bytes_s"])
    print(
        f"{report['hosts']} hosts, ports {rates} Mbit/s; {report['layers']} MoE layers, "
        f"{report['batch_tokens']} tokens a batch, {report['batches']} batches after {report['warmup']} "
        f"warm-up; experts {report['hidden']} x {report['intermediate']}, exchange {report['strategy']}"
    )
    print(f"  {'policy':<7} {'p50':>9} {'p95':>9} {'pred p50':>9} {'pred p95':>9} {'static/this p95':>16}")
    for name, entry in report["policies"].items():
        m, p = entry["measured"], entry["predicted"]
        predicted = f"{p['p50_s'] * 1e3:>7.1f}ms {p['p95_s'] * 1e3:>7.1f}ms" if p else f"{'-':>9} {'-':>9}"
        ratio = entry.get("static_over_this_p95")
        print(
            f"  {name:<7} {m['p50_s'] * 1e3:>7.1f}ms {m['p95_s'] * 1e3:>7.1f}ms {predicted} "
            f"{'' if ratio is None else f'{ratio:.3f}x':>16}"
        )
    colocation = report.get("colocation")
    if colocation:
        print(
            f"colocation: both models on every host {colocation['colocated_s']:.3f} s, each alone on "
            f"half the hosts {colocation['alone_on_half_s']:.3f} s: "
            f"{colocation['throughput_gain']:.2f}x throughput"
        )


def _plan_placements(plan_path: str, trace, hosts: int, trace_path: Path) -> list[dict[str, list]]:
    """Each layer's slots (exclusive or replicated), as the ranks read them with --placement."""
    plan = load_plan(plan_path)
    if plan.mode == "colocated":
        raise ShunterError(f"{plan_path}: a colocated plan places two models; bench a2a runs one")
    if plan.num_devices != hosts:
        raise ShunterError(
            f"{plan_path}: the plan places experts on {plan.num_devices} devices but --hosts is {hosts}; "
            f"make a plan for {hosts} devices"
        )
    check_trace_against(plan, trace, str(trace_path))
    return [plan.slots(layer).to_dict() for layer in range(plan.num_layers)]


def print_a2a_table(report: dict) -> None:
    calibration = report["calibration"]
    rates = ", ".join(f"{b * 8 / 1e6:g}" for b in report["bandwidth_bytes_s"])
    print(
        f"{report['hosts']} hosts, ports {rates} Mbit/s, TCP {report.get('congestion_control', '?')}; "
        f"one flow sustains {calibration['efficiency']:.3f} "
        f"of the shaped rate, all pairs at once {calibration['concurrent_efficiency']:.3f} of that after "
        f"{calibration['concurrent_startup_s'] * 1e3:.0f} ms, one flow per port "
        f"{calibration['matching_efficiency']:.3f} and {calibration['round_startup_s'] * 1e3:.1f} ms "
        f"a round, every flow as one round {calibration.get('merged_round_efficiency', 1.0):.3f} of that, "
        f"a port flows meet at {calibration.get('shared_port_efficiency', 1.0):.3f}; "
        "latency "
        f"{calibration['latency_s'] * 1e6:.0f} us; {report['tokens_per_layer']} tokens "
        f"x {report['row_bytes']} B per layer; median of {report['reps']} after {report['warmup']} warm-up"
    )
    for layer in report["layers"]:
        print(
            f"\nlayer {layer['layer']}: {format_bytes(layer['remote_bytes'])} crosses the network each way; "
            f"lower bound {layer['lower_bound_s'] * 1e3:.1f} ms (dispatch + combine)"
        )
        print(f"  {'strategy':<13} {'measured':>10} {'predicted':>10} {'pred/meas':>9} {'x bound':>8}")
        for name, s in layer["strategies"].items():
            print(
                f"  {name:<13} {s['median_s'] * 1e3:>8.1f}ms {s['predicted_s'] * 1e3:>8.1f}ms "
                f"{s['predicted_over_measured']:>9.3f} {s['over_bound']:>8.3f}"
            )
        print(
            f"  schedule speedup: {layer['speedup_over_all_to_all']:.2f}x over all_to_all_single, "
            f"{layer['speedup_over_random_order']:.2f}x over random order"
        )


def _register_train(kinds: argparse._SubParsersAction) -> None:
    train = kinds.add_parser(
        "train",
        help="expert-parallel training steps under each allreduce scheduler on an emulated cluster (root)",
        description=train_bench.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument("--hosts", type=int, default=4, help="emulated hosts, one rank each (default 4)")
    train.add_argument("--bandwidth", default="400Mbit/s", help="port rate of every host (default 400Mbit/s)")
    train.add_argument("--steps", type=int, default=5, help="timed steps per variant (default 5)")
    train.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    train.add_argument(
        "--config", type=Path, default=None, help="TOML of TrainConfig keys for the model (default: built in)"
    )
    train.add_argument("--corpus", type=Path, default=None, help="*.py to train on (default: stdlib json/)")
    train.add_argument(
        "--micro-op-bytes",
        type=flag_type(parse_bytes),
        default=512 * 1000,
        help="Lina's micro-op (default 512KB: 30 MB at 100 Gbit/s is as long on the wire as 120 KB at "
        "400 Mbit/s; smaller costs per-op overhead on gloo)",
    )
    train.add_argument(
        "--bucket-bytes",
        type=flag_type(parse_bytes),
        default=None,
        help="overlap/priority allreduce bucket (default: one block's dense gradients)",
    )
    train.add_argument(
        "--local",
        action="store_true",
        help="run the ranks on this machine's loopback with torchrun, unshaped (no root needed; "
        "--bandwidth then only feeds the simulator)",
    )
    add_cluster_run_arguments(train, timeout_s=300.0)
    train.add_argument(
        "--plot",
        metavar="FILE",
        default=None,
        help="draw each variant's per-rank timeline (.png, .pdf, .svg)",
    )
    train.set_defaults(func=run_train, outputs={"out": "file", "plot": "figure"})


def run_train(args: argparse.Namespace) -> int:
    from shunter.train.corpus import stdlib_dir

    if args.hosts < 2:
        raise ShunterError(f"--hosts: expert-parallel training needs at least 2 hosts, got {args.hosts}")
    if args.steps < 1 or args.warmup < 0:
        raise ShunterError("--steps must be at least 1 and --warmup at least 0")
    if args.micro_op_bytes <= 0:
        raise ShunterError(f"--micro-op-bytes: must be a positive number of bytes, got {args.micro_op_bytes}")
    if args.bucket_bytes is not None and args.bucket_bytes <= 0:
        raise ShunterError(f"--bucket-bytes: must be a positive number of bytes, got {args.bucket_bytes}")
    bandwidth = parse_host_bandwidths(args.bandwidth, args.hosts)
    if len(set(bandwidth)) != 1:
        raise ShunterError("--bandwidth: bench train shapes every host alike; give one rate")
    config = train_bench.read_model_config(args.config, {})
    corpus = args.corpus if args.corpus is not None else stdlib_dir() / "json"
    if not args.local:
        check_environment()
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    with tempfile.TemporaryDirectory(prefix="shunter-train-bench-") as scratch:
        options = dict(
            config=config, corpus=corpus, hosts=args.hosts, bandwidth_bytes_s=bandwidth[0], steps=args.steps,
            warmup=args.warmup, micro_op_bytes=args.micro_op_bytes, timeout_s=args.timeout,
            scratch=Path(scratch), bucket_bytes=args.bucket_bytes,
        )  # fmt: skip
        if args.local:
            report = train_bench.run_bench(
                **options, launch=train_bench.torchrun_launcher(args.hosts, args.port)
            )
        else:
            with EmulatedCluster(
                args.hosts, bandwidth, congestion_control=args.congestion_control
            ) as cluster:

                def launch(command: list[str]) -> int:
                    return run_on_cluster(cluster, command, port=args.port, out=sys.stderr, err=sys.stderr)

                report = train_bench.run_bench(**options, launch=launch)
    report["emulated"] = not args.local
    if args.plot:
        train_bench.plot_timelines(report, Path(args.plot))
    return emit_report(report, args, train_bench.print_train_table)
