"""`shunter generate MODEL --prompt TEXT`: stream a completion and report its speed."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.distributed as dist

from shunter.commands.common import (
    DEFAULT_MODEL,
    DEFAULT_MODEL_HELP,
    encode_prompt,
    parse_prompt_ids,
    peak_rss_bytes,
    print_json,
)
from shunter.errors import ShunterError
from shunter.model.generate import GenerationResult, generate
from shunter.model.loader import DTYPE_NAMES, TRACE_FILE, model_trace, resolve_model_dir
from shunter.model.sampling import SamplingParams, check_penalty
from shunter.model.spec import ModelSpec, load_spec
from shunter.model.tokenizer import Tokenizer
from shunter.network.transport import STRATEGIES
from shunter.offload import OffloadedModel
from shunter.offload.choose import choose_executor
from shunter.offload.device import resolve_device
from shunter.offload.planner import plan_as_dict
from shunter.parallel.inference import (
    BALANCES,
    LiveOptions,
    ModelRun,
    generate_colocated,
    generate_expert_parallel,
    load_expert_parallel_model,
    new_model_group,
    placements_of,
    port_bandwidths,
    sequences_of_rank,
)
from shunter.parallel.runtime import init_from_environment, run_rank
from shunter.plan.document import load_plan
from shunter.trace import RoutingTrace, load_trace
from shunter.units import flag_type, parse_bytes, parse_number, parse_seed


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("generate", help="generate text with an MoE model", description=__doc__)
    p.add_argument("model", metavar="MODEL", nargs="?", default=DEFAULT_MODEL, help=DEFAULT_MODEL_HELP)
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="prompt text (needs the model's tokenizer.json)")
    prompt.add_argument("--prompt-ids", help="prompt as comma-separated token ids, e.g. 1,2,3")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate (default 32)")
    p.add_argument(
        "--temperature", type=flag_type(parse_number, minimum=0), default=0.0, help="0 = greedy (default)"
    )
    p.add_argument(
        "--top-p",
        type=flag_type(parse_number, above=0),
        default=1.0,
        help="nucleus sampling mass (default 1.0)",
    )
    p.add_argument("--seed", type=flag_type(parse_seed), default=0, help="sampling seed (default 0)")
    p.add_argument(
        "--frequency-penalty",
        type=flag_type(parse_number),
        default=0.0,
        help="subtract this times a token's count so far from its logit, as OpenAI does (-2 to 2; default 0)",
    )
    p.add_argument(
        "--presence-penalty",
        type=flag_type(parse_number),
        default=0.0,
        help="subtract this from the logit of every token generated so far, as OpenAI does (-2 to 2; "
        "default 0)",
    )
    p.add_argument("--batch", type=int, default=1, help="run the prompt as a batch of this many sequences")
    p.add_argument(
        "--dtype", choices=["float32", "bfloat16", "float16"], help="compute dtype (default: checkpoint's)"
    )
    p.add_argument(
        "--memory",
        help="memory budget for weights + KV cache (e.g. 512MiB); a model larger "
        "than this streams its weights from disk with the offload engine",
    )
    p.add_argument(
        "--host-memory",
        default="0",
        help="host RAM for weights the device does not hold (offload; e.g. 8GiB): the most popular "
        "experts first, then layer blocks, stream to the device from RAM instead of disk (pinned for a "
        "GPU). On a CPU the device is host RAM, so this only adds room. Default 0",
    )
    p.add_argument(
        "--device",
        default="cpu",
        help="where the model computes: cpu (default), cuda, cuda:N, or auto (a GPU when usable). On a GPU "
        "the whole model is placed there unless --memory (the GPU's budget) is below its size",
    )
    p.add_argument(
        "--batches",
        default="1",
        metavar="N|auto",
        help="micro-batches sharing each layer's load (offload; default 1); auto: the planner measures "
        "this machine and picks the smallest number with no pipeline bubble",
    )
    p.add_argument(
        "--explain",
        action="store_true",
        help="print how the offload planner picks --batches to stderr (with --json, also under 'plan')",
    )
    p.add_argument(
        "--trace",
        type=Path,
        help="routing trace that seeds the expert prefetcher (offload; "
        f"default: the model directory's {TRACE_FILE}, if any)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    parallel = add_expert_parallel_flags(p, "generate")
    parallel.add_argument(
        "--colocate",
        metavar="MODEL_B",
        help="serve a second model on the same ranks (Aurora): --plan must be a colocated plan "
        "(`shunter plan --colocate`) for MODEL and MODEL_B; both generate from the prompt, interleaved",
    )
    p.set_defaults(func=run)


def add_expert_parallel_flags(p: argparse.ArgumentParser, command: str) -> argparse._ArgumentGroup:
    """--plan, --balance, --strategy and --timeout of a command that runs expert-parallel under
    torchrun (generate, serve); returns their group for the command's own."""
    parallel = p.add_argument_group(
        f"expert parallelism (under torchrun: `torchrun --nproc-per-node N -m shunter {command} ...`)"
    )
    parallel.add_argument(
        "--plan",
        type=Path,
        help="a plan from `shunter plan --out` for MODEL on N devices: each rank holds its slots' experts "
        "(exclusive or replicated); default under torchrun: contiguous blocks of experts",
    )
    parallel.add_argument(
        "--balance",
        choices=BALANCES,
        default="plan",
        help="plan: a replicated expert's tokens split by the plan's shares (default); live: by the batch's "
        "counts, and each layer re-planned per batch as Lina does (path estimate from --trace or the "
        "model's trace, then the gate's counts), experts copied in from the checkpoint when that pays",
    )
    parallel.add_argument(
        "--strategy",
        choices=STRATEGIES,
        default="scheduled",
        help="how the all-to-alls run (default scheduled)",
    )
    parallel.add_argument(
        "--timeout",
        type=flag_type(parse_number, above=0),
        default=120.0,
        help="seconds any collective may wait before every rank stops with one line (default 120)",
    )
    return parallel


def run_stats(
    path: Path,
    spec: ModelSpec,
    dtype: torch.dtype,
    engine: str,
    batch: int,
    prompt: list[int],
    result: GenerationResult,
    peak_rss: int,
) -> dict[str, object]:
    """What `--json` reports of one generation, whichever engine ran it."""
    return {
        "model": str(path),
        "family": spec.family,
        "dtype": str(dtype).removeprefix("torch."),
        "engine": engine,
        "batch": batch,
        "prompt_tokens": len(prompt),
        "generated_ids": result.tokens[0],
        "generated_tokens": result.generated_tokens,
        "prefill_s": result.prefill_s,
        "decode_s": result.decode_s,
        "prefill_tok_s": result.prefill_tok_s,
        "decode_tok_s": result.decode_tok_s,
        "peak_rss_bytes": peak_rss,
    }


def run(args: argparse.Namespace) -> int:
    if args.max_new_tokens < 1:
        raise ShunterError(f"--max-new-tokens: must be at least 1, got {args.max_new_tokens}")
    if args.batch < 1:
        raise ShunterError(f"--batch: must be at least 1, got {args.batch}")
    if not 0.0 < args.top_p <= 1.0:
        raise ShunterError(f"--top-p: must be in (0, 1], got {args.top_p}")
    for flag in ("frequency_penalty", "presence_penalty"):
        check_penalty(getattr(args, flag), "--" + flag.replace("_", "-"))
    batches = parse_batches(args.batches)
    path = resolve_model_dir(args.model)
    spec, tokenizer = load_spec(path), Tokenizer.from_model_dir(path)
    if args.prompt_ids is not None:
        prompt = parse_prompt_ids(args.prompt_ids, spec)
    else:
        prompt = encode_prompt(args.prompt, tokenizer, path)
    if len(prompt) + args.max_new_tokens > spec.max_position_embeddings:
        raise ShunterError(
            f"prompt ({len(prompt)} tokens) + --max-new-tokens ({args.max_new_tokens}) exceeds the model's "
            f"max_position_embeddings ({spec.max_position_embeddings})"
        )

    # the planner sizes a decode step at its mean context over the run
    context_tokens = len(prompt) + args.max_new_tokens // 2
    # a model directory that carries its own routing trace (the built-in model does) seeds the prefetcher
    trace = load_trace(args.trace) if args.trace else model_trace(path)
    if args.plan is not None or args.balance != "plan" or args.colocate or "WORLD_SIZE" in os.environ:
        return run_rank(lambda: run_expert_parallel(args, path, spec, tokenizer, prompt, trace))
    choice = choose_executor(
        path,
        spec,
        dtype=args.dtype,
        memory_bytes=None if args.memory is None else parse_bytes(args.memory, "--memory"),
        host_memory_bytes=parse_bytes(args.host_memory, "--host-memory"),
        device=resolve_device(args.device),
        sequences=args.batch,
        max_slots=len(prompt) + args.max_new_tokens,
        context_tokens=context_tokens,
        batches=batches,
        trace=trace,
        trace_source=str(args.trace),
        explain_plan=args.explain,
    )
    model, plan = choice.model, choice.plan
    for note in choice.notes:
        print(note, file=sys.stderr)
    if choice.batches_note:
        print(f"--batches {args.batches}: {choice.batches_note} (--batch)", file=sys.stderr)
    stream = start_stream(args, tokenizer, prompt)
    sampling = SamplingParams(
        args.temperature, args.top_p, args.seed, args.frequency_penalty, args.presence_penalty
    )
    result = generate(
        model,
        [prompt] * args.batch,
        args.max_new_tokens,
        sampling,
        stop_ids=spec.eos_token_ids,
        on_step=stream,
    )
    engine = "offload" if isinstance(model, OffloadedModel) else "in-memory"
    stats = run_stats(path, spec, model.dtype, engine, args.batch, prompt, result, peak_rss_bytes())
    if not isinstance(model, OffloadedModel):
        stats["device"] = str(model.device)
    if plan is not None:
        stats["plan"] = plan_as_dict(plan) | {"sequences_given": args.batch}
    elif args.explain:
        stats["plan"] = None  # in memory: the planner is not used
    if isinstance(model, OffloadedModel):
        stats |= {
            "device": str(model.device.device),
            "memory_budget_bytes": model.placement.budget_bytes,
            "host_memory_budget_bytes": model.placement.host_budget_bytes,
            "host_tier_bytes": model.placement.host_bytes,
            "bytes_read": model.reader.stats.bytes_read,
            "prefetch_hit_rate": model.prefetcher.hit_rate,
            "batches": model.options.num_batches,
        }
        model.close()
    print_result(args, spec, tokenizer, prompt, result, stats)
    return 0


def parse_batches(text: str) -> int | None:
    """--batches: a positive integer, or None for 'auto' (the planner decides)."""
    if text.strip().lower() == "auto":
        return None
    try:
        value = int(text)
    except ValueError:
        raise ShunterError(f"--batches: expected a positive integer or 'auto', got {text!r}") from None
    if value < 1:
        raise ShunterError(f"--batches: must be at least 1 (or 'auto'), got {value}")
    return value


def print_result(
    args: argparse.Namespace,
    spec: ModelSpec,
    tokenizer: Tokenizer | None,
    prompt: list[int],
    result: GenerationResult,
    stats: dict[str, object],
) -> None:
    """The end of a run: one JSON object, or the streamed text's newline and the speed line."""
    if tokenizer is not None:
        stats["text"] = tokenizer.decode(result.tokens[0])
    if args.json:
        print_json(stats)
    else:
        sys.stdout.write("\n")
        print(
            f"[{spec.family} {stats['dtype']} batch {args.batch} {stats['engine']}] "
            f"prefill {len(prompt) * args.batch} tok "
            f"at {result.prefill_tok_s:.1f} tok/s, decode {result.generated_tokens} tok at "
            f"{result.decode_tok_s:.1f} tok/s, peak RSS {stats['peak_rss_bytes'] / 2**20:.0f} MiB",
            file=sys.stderr,
        )


def start_stream(
    args: argparse.Namespace, tokenizer: Tokenizer | None, prompt: list[int], stop_ids: Sequence[int] = ()
) -> Callable[[list[int | None]], None]:
    """Print the prompt (unless --json) and return the on_step that streams the first sequence's
    tokens; it goes quiet after a token in stop_ids (for a loop that runs on past them)."""
    streamed: list[int] = []
    printed = ""
    stop = set(stop_ids)

    def stream(step_tokens: list[int | None]) -> None:
        nonlocal printed
        token = step_tokens[0]
        if token is None or args.json or (streamed and streamed[-1] in stop):
            return
        streamed.append(token)
        if tokenizer is None:
            sys.stdout.write(f"{token} ")
        else:
            text = tokenizer.decode(streamed)
            sys.stdout.write(text[len(printed) :])
            printed = text
        sys.stdout.flush()

    if not args.json:
        sys.stdout.write(tokenizer.decode(prompt) if tokenizer else " ".join(map(str, prompt)) + " ")
        sys.stdout.flush()
    return stream


def run_expert_parallel(
    args: argparse.Namespace,
    path: Path,
    spec: ModelSpec,
    tokenizer: Tokenizer | None,
    prompt: list[int],
    trace: RoutingTrace | None,
) -> int:
    """One rank of `torchrun -m shunter generate`: the batch's sequences split over the ranks
    (attention data-parallel), every MoE layer expert-parallel under --plan (contiguous without);
    rank 0 prints what single-process generate prints. With --colocate a second model runs on the
    same ranks under the colocated plan's second placement; the two models' steps interleave (each
    on its own thread and process group), and its figures come under "colocated_model"."""
    for flag, default in (("memory", None), ("host_memory", "0"), ("device", "cpu"), ("batches", "1")):
        if getattr(args, flag) != default:
            raise ShunterError(f"--{flag.replace('_', '-')} is for the offload engine; expert parallelism "
                               "holds every rank's weights in memory")  # fmt: skip
    plan = load_plan(args.plan) if args.plan is not None else None  # bad plans fail before the group
    models = [(path, spec, tokenizer)]
    if args.colocate is not None:
        if plan is None or plan.mode != "colocated":
            raise ShunterError("--colocate: needs --plan with a colocated plan (`shunter plan --colocate`)")
        other = resolve_model_dir(args.colocate)
        models.append((other, load_spec(other), Tokenizer.from_model_dir(other)))
        if max(prompt) >= models[1][1].vocab_size:
            raise ShunterError(f"--colocate: the prompt has ids beyond {other}'s vocabulary")
    elif plan is not None and plan.mode == "colocated":
        raise ShunterError(
            f"{plan.source}: a colocated plan places two models: name the second with --colocate"
        )
    if plan is not None and os.environ.get("WORLD_SIZE", "").isdigit():
        for index, (model_path, model_spec, _) in enumerate(models):
            placements_of(model_spec, int(os.environ["WORLD_SIZE"]), plan, str(model_path), index)
    rank, world = init_from_environment(args.timeout)
    sampling = SamplingParams(
        args.temperature, args.top_p, args.seed, args.frequency_penalty, args.presence_penalty
    )
    runs = []
    for index, (model_path, model_spec, _) in enumerate(models):
        dtype = DTYPE_NAMES[args.dtype] if args.dtype else model_spec.torch_dtype
        ep = load_expert_parallel_model(
            model_path, dtype, placements_of(model_spec, world, plan, str(model_path), index),
            strategy=args.strategy, bandwidth_bytes_s=port_bandwidths(plan, world), seed=args.seed,
            balance=args.balance, live=LiveOptions(profile=trace if index == 0 else None),
            group=new_model_group() if len(models) > 1 else None,
        )  # fmt: skip
        runs.append(
            ModelRun(ep, [prompt] * args.batch, args.max_new_tokens, sampling, model_spec.eos_token_ids)
        )
    if len(runs) == 1:
        runs[0].on_step = start_stream(args, tokenizer, prompt, spec.eos_token_ids) if rank == 0 else None
        results = [generate_expert_parallel(runs[0].model, *runs[0].arguments())]
    else:
        results = generate_colocated(runs)
    peak = torch.tensor([peak_rss_bytes()], dtype=torch.float64)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    if rank == 0:
        all_stats = []
        for (model_path, model_spec, _), run, result in zip(models, runs, results, strict=True):
            dtype = run.model.model.dtype
            stats = run_stats(
                model_path, model_spec, dtype, "expert-parallel", args.batch, prompt, result, int(peak.item())
            ) | {
                "world_size": world,
                "placement": str(args.plan) if args.plan else "contiguous",
                "strategy": args.strategy,
                "balance": args.balance,
                "sequences_per_rank": [len(sequences_of_rank(args.batch, r, world)) for r in range(world)],
            }
            if run.model.live_stats():
                stats["live"] = run.model.live_stats()
            all_stats.append(stats)
        if len(models) == 1:
            print_result(args, spec, tokenizer, prompt, results[0], all_stats[0])
        elif args.json:
            print_json(all_stats[0] | {"colocated_model": all_stats[1]})
        else:  # no streaming while two models interleave: each completion when both are done
            for (_, model_spec, model_tokenizer), result, stats in zip(
                models, results, all_stats, strict=True
            ):
                stream = start_stream(args, model_tokenizer, prompt, model_spec.eos_token_ids)
                for token in result.tokens[0]:
                    stream([token])
                print_result(args, model_spec, model_tokenizer, prompt, result, stats)
    dist.barrier()
    return 0
