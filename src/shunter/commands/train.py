"""`shunter train --out DIR`: train a Mixtral-layout MoE language model on Python sources.

Every TrainConfig field is a flag (--hidden-size 256) and a key of an optional TOML file
(--config train.toml; flags win). The corpus defaults to the standard library of the running
interpreter. State is saved every --checkpoint-every steps and at the end in DIR.work; --resume continues it
(also a finished run, with more --steps). DIR is replaced only if it is empty or a model Shunter
wrote; --overwrite replaces anything.
"""

from __future__ import annotations

import argparse
import dataclasses
import tomllib
from pathlib import Path
from typing import Any

from shunter.commands.common import print_json
from shunter.errors import FieldError, ShunterError
from shunter.files import read_text_input
from shunter.plan.document import load_plan
from shunter.train import TrainConfig, Trainer, TrainResult
from shunter.train.comm import COMM_SCHEDULERS
from shunter.train.corpus import stdlib_dir
from shunter.train.packing import (
    DEFAULT_PACKING_EVERY,
    DEFAULT_PACKING_FROM_STEP,
    PACKING_RULES,
    PackingRule,
)
from shunter.train.parallel import (
    DEFAULT_A2A_CHUNKS,
    DEFAULT_BUCKET_BYTES,
    DEFAULT_MICRO_OP_BYTES,
    DEFAULT_TIMEOUT_S,
    ParallelOptions,
)
from shunter.units import parse_bytes


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="train an MoE language model",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", required=True, type=Path, help="output model directory (HF layout)")
    p.add_argument("--corpus", type=Path, default=None, help="file or directory of *.py (default: stdlib)")
    p.add_argument("--work", type=Path, default=None, help="work directory (default: OUT.work)")
    p.add_argument("--config", type=Path, default=None, help="TOML file with TrainConfig keys")
    p.add_argument("--resume", action="store_true", help="continue from the work directory's checkpoint")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace OUT even if it holds files Shunter did not write (default: refuse)",
    )
    p.add_argument("--json", action="store_true", help="print a JSON summary at the end")
    p.add_argument(
        "--stop-after",
        type=int,
        default=None,
        metavar="N",
        help="stop after N steps of this run, saving the state (continue with --resume)",
    )
    parallel = p.add_argument_group(
        "expert-parallel training (launch with torchrun --nproc-per-node N -m shunter train ...)"
    )
    parallel.add_argument(
        "--expert-parallel",
        type=int,
        default=None,
        metavar="N",
        help="spread the experts over N ranks (the number torchrun launches); each rank trains on "
        "batch-size/N sequences of every batch",
    )
    parallel.add_argument(
        "--comm",
        choices=COMM_SCHEDULERS,
        default="overlap",
        help="dense-gradient allreduce: overlap (DDP's buckets as soon as ready), priority (buckets, "
        "never during an all-to-all), lina (priority + micro-ops); default overlap",
    )
    parallel.add_argument(
        "--micro-op-bytes",
        default=str(DEFAULT_MICRO_OP_BYTES),
        help="Lina's allreduce micro-op size (default 30MB)",
    )
    parallel.add_argument(
        "--a2a-chunks",
        type=int,
        default=DEFAULT_A2A_CHUNKS,
        metavar="K",
        help="run each MoE layer's all-to-alls as K chunks of its tokens, pipelined with the expert FFN "
        "(Lina's partitioning of the all-to-all); default 1, no chunking",
    )
    parallel.add_argument(
        "--expert-packing",
        action="store_true",
        help="Lina's expert packing: from --packing-from-step, every --packing-every steps, halve the "
        "expert-parallel ranks (twice the experts on each) while an expert-FFN micro-op is shorter "
        "than an all-to-all micro-op; keeps at least 2",
    )
    parallel.add_argument(
        "--packing-from-step", type=int, default=DEFAULT_PACKING_FROM_STEP, metavar="N",
        help=f"first step after which packing is decided (default {DEFAULT_PACKING_FROM_STEP}, as Lina)",
    )  # fmt: skip
    parallel.add_argument(
        "--packing-every", type=int, default=DEFAULT_PACKING_EVERY, metavar="N",
        help=f"steps between packing decisions (default {DEFAULT_PACKING_EVERY}, as Lina)",
    )  # fmt: skip
    parallel.add_argument(
        "--packing-rule", default="priced", metavar="|".join(PACKING_RULES),
        help="priced (default): Lina's rule, and only while the all-to-all bytes packing saves exceed the "
        "expert-gradient allreduce bytes it adds; lina: Lina's rule alone",
    )  # fmt: skip
    parallel.add_argument(
        "--packing-threshold", type=float, default=1.0, metavar="X",
        help="pack while an FFN micro-op takes less than X times an all-to-all micro-op (default 1, "
        "Lina's rule)",
    )  # fmt: skip
    parallel.add_argument(
        "--bucket-bytes",
        default=str(DEFAULT_BUCKET_BYTES),
        help="overlap/priority bucket size (default 25MiB)",
    )
    parallel.add_argument(
        "--plan", type=Path, default=None, help="plan.json whose exclusive placement puts the experts"
    )
    parallel.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        help="seconds any collective may take (default 300)",
    )
    for field in dataclasses.fields(TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        if field.type in ("bool", bool):
            p.add_argument(flag, dest=field.name, default=None, action=argparse.BooleanOptionalAction)
        else:
            kind = {"int": int, "float": float, "str": str}[str(field.type)]
            p.add_argument(flag, dest=field.name, type=kind, default=None, help=f"default {field.default}")
    p.set_defaults(func=run)


def config_from(args: argparse.Namespace) -> TrainConfig:
    values: dict[str, Any] = {}
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    if args.config is not None:
        try:
            values = tomllib.loads(read_text_input(args.config, "config", "TOML"))
        except tomllib.TOMLDecodeError as exc:
            raise ShunterError(f"{args.config}: not valid TOML ({exc})") from None
        unknown = sorted(set(values) - names)
        if unknown:
            raise ShunterError(
                f"{args.config}: unknown key {unknown[0]!r} (known: {', '.join(sorted(names))})"
            )
        _check_types(values, str(args.config))
        try:  # a bad value from the file is named by the file and its key, not by the flag
            TrainConfig(**values).validate()
        except FieldError as exc:
            raise ShunterError(f"{args.config}: {exc}") from None
    values |= {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    return TrainConfig(**values)


def _check_types(values: dict[str, Any], source: str) -> None:
    """Each key of a config file holds the type its TrainConfig field has (an int may stand for a
    float; a bool is not a number)."""
    kinds = {f.name: str(f.type) for f in dataclasses.fields(TrainConfig)}
    for key, value in values.items():
        kind = kinds[key]
        ok = {
            "int": isinstance(value, int) and not isinstance(value, bool),
            "float": isinstance(value, int | float) and not isinstance(value, bool),
            "bool": isinstance(value, bool),
            "str": isinstance(value, str),
        }[kind]
        if not ok:
            raise ShunterError(
                f"{source}: {key}: expected {'an' if kind == 'int' else 'a'} {kind}, got {value!r}"
            )


def run(args: argparse.Namespace) -> int:
    config = config_from(args)
    corpus = args.corpus if args.corpus is not None else stdlib_dir()
    if args.stop_after is not None and args.stop_after < 1:
        raise ShunterError(f"--stop-after: must be at least 1, got {args.stop_after}")
    if args.expert_parallel is not None:
        return _run_parallel(args, config, corpus)
    parallel_only = {
        "--comm": args.comm != "overlap",
        "--plan": args.plan is not None,
        "--micro-op-bytes": args.micro_op_bytes != str(DEFAULT_MICRO_OP_BYTES),
        "--bucket-bytes": args.bucket_bytes != str(DEFAULT_BUCKET_BYTES),
        "--a2a-chunks": args.a2a_chunks != DEFAULT_A2A_CHUNKS,
        "--expert-packing": args.expert_packing,
    }
    for flag, given in parallel_only.items():
        if given:
            raise ShunterError(
                f"{flag}: only for expert-parallel training; add --expert-parallel N under torchrun"
            )
    trainer = Trainer(config, corpus, args.out, args.work, overwrite=args.overwrite, resume=args.resume)
    return _report(args, trainer.run(resume=args.resume, stop_after=args.stop_after))


def _parallel_options(args: argparse.Namespace, config: TrainConfig) -> ParallelOptions:
    placements, source = None, "plan"
    if args.plan is not None:
        plan = load_plan(args.plan)
        placements, source = [plan.slots(layer) for layer in range(plan.num_layers)], str(args.plan)
    options = ParallelOptions(
        expert_parallel=args.expert_parallel,
        comm=args.comm,
        micro_op_bytes=parse_bytes(args.micro_op_bytes, "--micro-op-bytes"),
        bucket_bytes=parse_bytes(args.bucket_bytes, "--bucket-bytes"),
        a2a_chunks=args.a2a_chunks,
        placements=placements,
        plan_source=source,
        packing=PackingRule(
            args.packing_from_step, args.packing_every, args.packing_threshold, rule=args.packing_rule
        )
        if args.expert_packing
        else None,
    )
    options.check_values(config)
    return options


def _run_parallel(args: argparse.Namespace, config: TrainConfig, corpus: Path) -> int:
    """One rank of an expert-parallel run: every failure is one line naming the rank."""
    from shunter.parallel.runtime import init_from_environment, run_rank
    from shunter.train.parallel import ParallelTrainer

    config.validate()
    try:
        options = _parallel_options(args, config)
    except FieldError as exc:  # a field of TrainConfig has no flag group here; name the flag plainly
        raise ShunterError(exc.render("--" + exc.field.replace("_", "-"))) from None

    def main() -> int:
        try:
            init_from_environment(args.timeout, backend="gloo")
            trainer = ParallelTrainer(
                config, corpus, args.out, options, args.work, overwrite=args.overwrite, resume=args.resume
            )
            return _report(
                args, trainer.run(resume=args.resume, stop_after=args.stop_after), quiet=trainer.rank != 0
            )
        except FieldError as exc:
            raise ShunterError(exc.render("--" + exc.field.replace("_", "-"))) from None

    return run_rank(main)


def _report(args: argparse.Namespace, result: TrainResult | None, quiet: bool = False) -> int:
    if quiet:
        return 0
    if result is None:
        print(f"stopped after --stop-after {args.stop_after} steps; continue with --resume")
        return 0
    summary = {
        "out": str(result.out_dir),
        "steps": result.steps,
        "tokens_seen": result.tokens_seen,
        "train_seconds": result.train_seconds,
        "final_train_loss_nats": result.final_loss,
        **result.heldout,
    }
    if args.json:
        print_json(summary)
    else:
        h = result.heldout
        print(
            f"wrote {result.out_dir}: held-out {h['model_bits_per_byte']:.3f} bits/byte "
            f"(unigram baseline {h['unigram_bits_per_byte']:.3f}) after {result.steps} steps, "
            f"{result.train_seconds / 60:.1f} min"
        )
    return 0
