"""Check the expert-parallel MoE block against the single-process one, on a real process group.

    torchrun --nproc-per-node 4 -m shunter.parallel.check [MODEL] [--tokens 5,0,17,3] [--json]
    torchrun --nproc-per-node 4 -m shunter.parallel.check --plan plan.json   # a plan's slots
    shunter cluster run --hosts 4 --bandwidth 1Gbit/s -- python -m shunter.parallel.check

Every rank builds the same random hidden states (seeded), takes its own slice (uneven sizes,
zero allowed), runs one MoE layer of MODEL expert-parallel with every dispatch strategy, and
rank 0 compares the gathered outputs with `moe_block` on all tokens (which the model tests check
against transformers). Exit 0 when every strategy matches within --tolerance.

    torchrun --nproc-per-node 2 -m shunter.parallel.check MODEL --generate 20

instead runs the whole model: every rank greedily generates from its own random prompt (--tokens
long) with every MoE layer expert-parallel, and rank 0 compares each rank's tokens with
single-process `generate` on that prompt. Exit 0 when all are equal.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from shunter.errors import ShunterError
from shunter.model.checkpoint import Checkpoint
from shunter.model.generate import generate
from shunter.model.layers import moe_block
from shunter.model.loader import DEFAULT_MODEL, DTYPE_NAMES, load_model, resolve_model_dir
from shunter.model.spec import ModelSpec, load_spec
from shunter.model.weights import CheckpointLayout
from shunter.network.transport import STRATEGIES
from shunter.parallel.inference import (
    BALANCES,
    LiveOptions,
    generate_expert_parallel,
    load_expert_parallel_model,
    moe_layer_indices,
    placements_of,
)
from shunter.parallel.moe import ExpertParallelMoE, as_slots, contiguous_placement
from shunter.parallel.runtime import init_from_environment, run_rank
from shunter.plan.document import check_model_against, load_plan
from shunter.plan.slots import ExpertSlots
from shunter.trace import load_trace


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m shunter.parallel.check", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("model", nargs="?", default=DEFAULT_MODEL, help="model directory or built-in name")
    parser.add_argument("--layer", type=int, default=None, help="which MoE layer (default: the first)")
    parser.add_argument(
        "--tokens", default=None, help="tokens per rank, comma-separated (default 7,0,13,...)"
    )
    parser.add_argument(
        "--placement", default=None, help="rank of each expert, comma-separated (default: even blocks)"
    )
    parser.add_argument(
        "--plan",
        default=None,
        help="a plan from `shunter plan --out` for MODEL: run the layer's slots (exclusive or replicated, "
        "a replicated expert's tokens split by the plan's shares)",
    )
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPE_NAMES))
    parser.add_argument("--tolerance", type=float, default=1e-5, help="max |difference| allowed (fp32)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds any collective may wait")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--generate",
        type=int,
        default=0,
        metavar="N",
        help="greedy-generate N tokens with the whole model, every MoE layer expert-parallel, and "
        "compare each rank's tokens with single-process generate (default 0: check one layer)",
    )
    parser.add_argument(
        "--strategy", default="scheduled", choices=STRATEGIES, help="the exchange with --generate"
    )
    parser.add_argument(
        "--balance",
        default="plan",
        choices=BALANCES,
        help="with --generate: plan (the plan's shares) or live (Lina's re-planning per batch)",
    )
    parser.add_argument("--trace", default=None, help="with --balance live: the path estimator's profile")
    parser.add_argument(
        "--free-moves",
        action="store_true",
        help="with --balance live: re-plan whenever the load improves, whatever copying experts costs",
    )
    parser.add_argument(
        "--copy-rate",
        type=float,
        default=None,
        metavar="BYTES_PER_S",
        help="with --balance live: price expert copies at this checkpoint read rate, not the measured one",
    )
    parser.add_argument("--json", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rank, world = init_from_environment(args.timeout)
    model_dir = resolve_model_dir(args.model)
    spec = load_spec(model_dir)
    layout = CheckpointLayout(spec, Checkpoint(model_dir))
    layer = _moe_layer(spec.moe_layers, args.layer)
    dtype = DTYPE_NAMES[args.dtype]
    tokens = _tokens_per_rank(args.tokens, world)
    if args.generate > 0:
        return _check_generation(args, rank, world, model_dir, layout, tokens)
    placement = _placement(args, spec, layer, world)

    generator = torch.Generator().manual_seed(args.seed)
    x_all = torch.randn(sum(tokens), spec.hidden_size, generator=generator).to(dtype)
    start = sum(tokens[:rank])
    x = x_all[start : start + tokens[rank]]
    bandwidth = np.linspace(2.0, 1.0, world)  # unequal ports, so the scheduled path uses lanes

    report: dict[str, object] = {
        "model": str(model_dir),
        "layer": layer,
        "world_size": world,
        "tokens": tokens,
        "slots": placement.to_dict(),
    }
    failures = []
    for strategy in STRATEGIES:
        block = ExpertParallelMoE.from_checkpoint(
            spec,
            layout,
            layer,
            placement,
            dtype,
            strategy=strategy,
            bandwidth_bytes_s=bandwidth,
            seed=args.seed,
        )
        out = block(x)
        gathered: list[torch.Tensor | None] = [None] * world
        dist.all_gather_object(gathered, out)
        if rank == 0:
            reference = moe_block(x_all, layout.moe(layer, dtype), spec).output
            difference = (torch.cat(gathered) - reference).abs().max().item() if x_all.numel() else 0.0  # type: ignore[arg-type]
            report[strategy] = {
                "max_abs_difference": difference,
                "rows_moved": block.last.rows.tolist(),
                "slot_rows": block.last.slot_rows.tolist(),
            }
            if not difference <= args.tolerance:
                failures.append(f"{strategy}: max |difference| {difference:.3g} > {args.tolerance:g}")
    if rank == 0:
        report["ok"] = not failures
        if args.json:
            json.dump(report, sys.stdout)
            sys.stdout.write("\n")
        else:
            for strategy in STRATEGIES:
                print(f"{strategy:>13}: max |difference| {report[strategy]['max_abs_difference']:.3g}")  # type: ignore[index]
            print("ok" if not failures else "FAILED: " + "; ".join(failures))
    dist.barrier()
    return 0 if not failures else 1


def _check_generation(
    args: argparse.Namespace,
    rank: int,
    world: int,
    model_dir: Path,
    layout: CheckpointLayout,
    tokens: list[int],
) -> int:
    """Whole-model greedy generation on the expert-parallel runtime (`parallel.inference`) against
    single-process generate; each rank generates from its own prompt."""
    spec = layout.spec
    plan = load_plan(args.plan) if args.plan is not None else None
    if args.placement is not None:
        placements = [_placement(args, spec, layer, world) for layer in moe_layer_indices(spec)]
    else:
        placements = placements_of(spec, world, plan, str(model_dir))
    live = LiveOptions(
        profile=load_trace(args.trace) if args.trace else None,
        free_moves=args.free_moves,
        copy_bytes_s=args.copy_rate,
    )
    ep = load_expert_parallel_model(
        model_dir,
        DTYPE_NAMES[args.dtype],
        placements,
        strategy=args.strategy,
        bandwidth_bytes_s=np.linspace(2.0, 1.0, world),
        seed=args.seed,
        balance=args.balance,
        live=live,
    )
    rng = np.random.default_rng(args.seed)
    prompts = [rng.integers(0, spec.vocab_size, max(1, n)).tolist() for n in tokens]
    # no stop tokens: every sequence runs the same number of forwards as its single-process twin
    gathered = generate_expert_parallel(ep, prompts, args.generate).tokens
    live_stats = ep.live_stats()
    ok = True
    if rank == 0:
        model = load_model(model_dir, dtype=args.dtype, pack=False).model
        reference = [generate(model, [prompt], args.generate).tokens[0] for prompt in prompts]
        ok = gathered == reference
        report = {
            "model": str(model_dir),
            "world_size": world,
            "strategy": args.strategy,
            "balance": args.balance,
            "prompts": prompts,
            "tokens": gathered,
            "reference": reference,
            "ok": ok,
        }
        if live_stats:
            report["live"] = live_stats
        if args.json:
            json.dump(report, sys.stdout)
            sys.stdout.write("\n")
        else:
            print("ok" if ok else f"FAILED: expert-parallel tokens {gathered} != single-process {reference}")
    dist.barrier()
    return 0 if ok else 1


def _placement(args: argparse.Namespace, spec: ModelSpec, layer: int, world: int) -> ExpertSlots:
    if args.plan is not None and args.placement is not None:
        raise ShunterError("--plan and --placement cannot be combined")
    if args.plan is not None:
        plan = load_plan(args.plan)
        moe_layers = [i for i, is_moe in enumerate(spec.moe_layers) if is_moe]
        check_model_against(plan, len(moe_layers), spec.num_experts, args.model)
        return as_slots(plan.slots(moe_layers.index(layer)), spec.num_experts, world)
    if args.placement is None:
        return as_slots(contiguous_placement(spec.num_experts, world), spec.num_experts, world)
    try:
        device_of_expert = [int(p) for p in args.placement.split(",")]
    except ValueError:
        raise ShunterError(f"--placement: expected comma-separated ranks, got {args.placement!r}") from None
    return as_slots(device_of_expert, spec.num_experts, world)


def _moe_layer(moe_layers: tuple[bool, ...], wanted: int | None) -> int:
    candidates = [i for i, is_moe in enumerate(moe_layers) if is_moe]
    if not candidates:
        raise ShunterError("the model has no MoE layer")
    if wanted is None:
        return candidates[0]
    if wanted not in candidates:
        raise ShunterError(f"--layer: {wanted} is not an MoE layer (MoE layers: {candidates})")
    return wanted


def _tokens_per_rank(text: str | None, world: int) -> list[int]:
    if text is None:
        # Uneven on purpose, and rank 1 has none.
        return [(7 + 6 * r) if r != 1 else 0 for r in range(world)]
    try:
        tokens = [int(t) for t in text.split(",")]
    except ValueError:
        raise ShunterError(f"--tokens: expected comma-separated integers, got {text!r}") from None
    if len(tokens) != world or min(tokens) < 0:
        raise ShunterError(f"--tokens: need {world} non-negative counts (one per rank), got {text!r}")
    return tokens


if __name__ == "__main__":
    sys.exit(run_rank(main))
