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
from shunter.train import TrainConfig, Trainer
from shunter.train.corpus import stdlib_dir


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
    trainer = Trainer(config, corpus, args.out, args.work, overwrite=args.overwrite, resume=args.resume)
    result = trainer.run(resume=args.resume)
    assert result is not None
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
