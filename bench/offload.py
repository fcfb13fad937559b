"""Build the offload benchmark's models, then run `shunter bench offload` on each.

The benchmark itself (every contender in its own process in a memory cgroup, page cache dropped
first) is `shunter bench offload` (shunter.bench.offload; docs/offload.md, "Benchmarking"). This
script only makes the two random-weight bf16 checkpoints it is run on, once, in .bench_cache/:

  mixtral  3.2 GB Mixtral-like: hidden 2048, 8 experts of 3584, top-2, 8 layers
  olmoe    3.6 GB OLMoE/Qwen3-MoE-like: hidden 2048, 64 experts of 1024, top-8, 4 layers

Needs root. Options other than these are passed to `shunter bench offload`:

    .venv/bin/python bench/offload.py [--models mixtral,olmoe] [--memory SIZE] [--out-dir DIR]
        [--reps 5] [--new-tokens 8] [--sequences 1,8,64] ...

The default cap is half the model's size on disk. Under it, the 64-expert model's lower rungs
(whole-layer streaming) cannot run at all: one layer's experts are 806 MB, beside 250 MiB of
embeddings and head in a weight budget of about 0.9 GiB; the bench reports them as not run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from shunter.cli import main as shunter_main
from shunter.model.export import mixtral_config, random_weights, save_checkpoint
from shunter.model.spec import spec_from_config

CACHE = Path(__file__).resolve().parent.parent / ".bench_cache"
# shapes for mixtral_config; both land at 3.2 GB in bf16, so one cap is the same share of either
MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "mixtral": (
        "mixtral-like-3g-bf16",
        dict(
            vocab_size=32000,
            hidden_size=2048,
            num_layers=8,
            num_heads=16,
            num_kv_heads=4,
            num_experts=8,
            top_k=2,
            intermediate_size=3584,
        ),
    ),
    # OLMoE-1B-7B's layer (hidden 2048, 64 experts of 1024, top-8; GQA with 4 KV heads as
    # Qwen3-MoE) with 4 of its 16 layers: 3.6 GB, experts 97% of every layer as in the original,
    # so loading only the routed experts matters as much as it does there
    "olmoe": (
        "olmoe-like-4l-bf16",
        dict(
            vocab_size=32000,
            hidden_size=2048,
            num_layers=4,
            num_heads=16,
            num_kv_heads=4,
            num_experts=64,
            top_k=8,
            intermediate_size=1024,
        ),
    ),
    # the same with 6 layers (5.4 GB): at half its size the whole-layer rungs of the ladder
    # (a layer's 64 experts in flight, 906 MiB) fit under the cap, which they cannot at 4 layers
    "olmoe6": (
        "olmoe-like-6l-bf16",
        dict(
            vocab_size=32000,
            hidden_size=2048,
            num_layers=6,
            num_heads=16,
            num_kv_heads=4,
            num_experts=64,
            top_k=8,
            intermediate_size=1024,
        ),
    ),
}


def build_model(path: Path, shape: dict[str, Any], dtype: str = "bfloat16") -> Path:
    """A Mixtral-layout checkpoint of `shape` (mixtral_config's arguments) with random weights,
    routers at std 0.05; built once (an existing config.json is taken as built)."""
    if (path / "config.json").is_file():
        return path
    print(f"building {path} ...", file=sys.stderr, flush=True)
    config = mixtral_config(**shape, dtype=dtype)
    weights = random_weights(spec_from_config(config), seed=0, std=0.02, router_std=0.05)
    return save_checkpoint(config, weights, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--models", default="mixtral,olmoe", help=f"which to run, of {', '.join(MODELS)} (default both)"
    )
    parser.add_argument(
        "--memory",
        "--cap",
        help="memory cap of every contender (default: half the model's size on disk, the acceptance setting)",
    )
    parser.add_argument("--out-dir", type=Path, help="write each model's JSON report here as NAME.json")
    args, passed_on = parser.parse_known_args(argv)
    names = [name.strip() for name in args.models.split(",") if name.strip()]
    unknown = [name for name in names if name not in MODELS]
    if unknown or not names:
        parser.error(f"--models: {', '.join(unknown) or 'none given'}; choose from {', '.join(MODELS)}")
    for name in names:
        directory, shape = MODELS[name]
        path = build_model(CACHE / directory, shape)
        cap = args.memory or str(sum(f.stat().st_size for f in path.glob("*.safetensors")) // 2)
        command = ["bench", "offload", str(path), "--memory", cap, *passed_on]
        if args.out_dir is not None:
            args.out_dir.mkdir(parents=True, exist_ok=True)
            command += ["--out", str(args.out_dir / f"{name}.json")]
        status = shunter_main(command)
        if status != 0:
            return status
    return 0


if __name__ == "__main__":
    sys.exit(main())
