"""Offloaded generation under a memory cap: Shunter's engine vs transformers + accelerate disk offload.

Each contender runs in its own process inside a memory cgroup made for the run (cgroup v1:
the cap counts the page cache too) with the page cache dropped first, so weights that "stream
from disk" really come from the disk. Needs root. Prints decode tok/s, peak memory of the
cgroup, and bytes read.

    .venv/bin/python bench/offload.py [--reps 3] [--cap 1.6GB] [--new-tokens 8]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from shunter.model.export import mixtral_config, random_weights, save_checkpoint
from shunter.model.spec import spec_from_config
from shunter.units import format_bytes, parse_bytes

CACHE = Path(__file__).resolve().parent.parent / ".bench_cache"
PROMPT_IDS = list(range(100, 116))


def build_model(path: Path) -> Path:
    """~3.2 GB bf16 Mixtral-like model (hidden 2048, 8 experts of 3584, top-2, 8 layers)."""
    if (path / "config.json").is_file():
        return path
    print(f"building {path} ...", file=sys.stderr)
    config = mixtral_config(
        vocab_size=32000,
        hidden_size=2048,
        num_layers=8,
        num_heads=16,
        num_kv_heads=4,
        num_experts=8,
        top_k=2,
        intermediate_size=3584,
        dtype="bfloat16",
    )
    weights = random_weights(spec_from_config(config), seed=0, std=0.02, router_std=0.05)
    save_checkpoint(config, weights, path)
    return path


def drop_page_cache() -> None:
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def run_capped(argv: list[str], cap_bytes: int) -> tuple[dict, int]:
    """Run argv in a fresh memory cgroup capped at cap_bytes; returns (its JSON output, peak bytes)."""
    own = next(
        line.split(":", 2)[2]
        for line in Path("/proc/self/cgroup").read_text().splitlines()
        if line.split(":")[1] == "memory"
    )
    group = Path("/sys/fs/cgroup/memory") / own.lstrip("/") / f"shunter-bench-{os.getpid()}"
    group.mkdir()
    try:
        (group / "memory.limit_in_bytes").write_text(str(cap_bytes))
        procs = str(group / "cgroup.procs")

        def enter() -> None:
            Path(procs).write_text(str(os.getpid()))

        done = subprocess.run(argv, preexec_fn=enter, capture_output=True, text=True)
        peak = int((group / "memory.max_usage_in_bytes").read_text())
    finally:
        group.rmdir()
    if done.returncode != 0:
        raise RuntimeError(f"{argv[:3]} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return json.loads(done.stdout[done.stdout.index("{") :]), peak


LADDER = """
import json, sys
from shunter.model.generate import generate
from shunter.offload import PipelineOptions, load_offloaded
path, rung = sys.argv[1], sys.argv[5]
memory, new, sequences = (int(a) for a in sys.argv[2:5])
options = {
    "simple": PipelineOptions(1, "layer", hot_first=False),
    "multi-batch": PipelineOptions(1, "layer", hot_first=False),
    "hot-prefetch": PipelineOptions(1, "hot", hot_first=False),
    "reorder": PipelineOptions(1, "hot", hot_first=True),
}[rung]
prompts = [list(range(100 + s, 116 + s)) for s in range(sequences)]
# the simple pipeline serves one sequence at a time; every other rung shares each load across all
groups = [[p] for p in prompts] if rung == "simple" else [prompts]
model = load_offloaded(path, memory, options=options, sequences=len(groups[0]), max_slots=16 + new)
decode_s, decoded = 0.0, 0
for group in groups:
    result = generate(model, group, new)
    decode_s += result.decode_s
    decoded += result.batch * result.decode_steps
print(json.dumps({"decode_tok_s": decoded / decode_s, "bytes_read": model.reader.stats.bytes_read,
                  "prefetch_hit_rate": model.prefetcher.hit_rate, "generated_ids": result.tokens[0]}))
"""

ACCELERATE = """
import json, sys, time, torch
from transformers import AutoModelForCausalLM
path, offload = sys.argv[1], sys.argv[2]
new, cpu, sequences = (int(a) for a in sys.argv[3:6])
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map="auto",
                                             max_memory={"cpu": cpu}, offload_folder=offload)
ids = torch.tensor([list(range(100 + s, 116 + s)) for s in range(sequences)])
times = []
class Clock:
    def put(self, _): times.append(time.perf_counter())
    def end(self): pass
with torch.inference_mode():
    out = model.generate(input_ids=ids, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                         streamer=Clock(), pad_token_id=0)
print(json.dumps({"decode_tok_s": sequences * (new - 1) / (times[-1] - times[1]),
                  "prefill_s": times[1] - times[0], "generated_ids": out[0, 16:].tolist()}))
"""


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--cap", default="1.6GB", help="memory cap of each contender's cgroup")
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--sequences", type=int, default=1, help="sequences in flight (the batch)")
    parser.add_argument("--ladder", action="store_true", help="run the ablation ladder rungs too")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench/offload.py needs root (memory cgroups, dropping the page cache)", file=sys.stderr)
        return 2
    cap = parse_bytes(args.cap)
    path = build_model(CACHE / "mixtral-like-3g-bf16")
    size = sum(p.stat().st_size for p in path.glob("*.safetensors"))
    print(
        f"model {path.name}: {format_bytes(size)} on disk; cap {format_bytes(cap)} per contender; "
        f"{args.sequences} sequences; threads {torch.get_num_threads()}",
        flush=True,
    )
    ids = ",".join(map(str, PROMPT_IDS))
    # the engine gets the cap less 768 MiB for the Python and torch runtime and the page cache of
    # their shared libraries, which the cgroup counts too; accelerate keeps up to
    # `cpu` of weights in RAM and memory-maps the rest from its offload_folder
    engine_bytes = cap - 3 * 2**28
    contenders = {}
    if args.sequences == 1 and not args.ladder:
        contenders["shunter"] = [
            sys.executable,
            "-m",
            "shunter.cli",
            "generate",
            str(path),
            "--prompt-ids",
            ids,
            "--max-new-tokens",
            str(args.new_tokens),
            "--memory",
            str(engine_bytes),
            "--json",
        ]
    else:  # the ladder's last rung ("reorder") is Shunter's default pipeline
        for rung in ["simple", "multi-batch", "hot-prefetch", "reorder"] if args.ladder else ["reorder"]:
            contenders[rung] = [
                sys.executable,
                "-c",
                LADDER,
                str(path),
                str(engine_bytes),
                str(args.new_tokens),
                str(args.sequences),
                rung,
            ]
    contenders["accelerate"] = [
        sys.executable,
        "-c",
        ACCELERATE,
        str(path),
        str(CACHE / "accelerate-offload"),
        str(args.new_tokens),
        str(int(cap * 0.5)),
        str(args.sequences),
    ]
    results: dict[str, list[dict]] = {name: [] for name in contenders}
    for rep in range(args.reps + 1):  # rep 0 warms up (and lets accelerate write its offload folder)
        for name, argv in contenders.items():
            drop_page_cache()
            started = time.perf_counter()
            output, peak = run_capped(argv, cap)
            output |= {"peak_cgroup_bytes": peak, "wall_s": time.perf_counter() - started}
            if rep > 0:
                results[name].append(output)
            print(
                f"rep {rep} {name:12s} decode {output['decode_tok_s']:.3f} tok/s  peak {format_bytes(peak)}  "
                f"read {format_bytes(output.get('bytes_read', 0))}",
                flush=True,
            )
    peer = statistics.median(r["decode_tok_s"] for r in results["accelerate"])
    for name, runs in results.items():
        rates = [r["decode_tok_s"] for r in runs]
        median = statistics.median(rates)
        print(
            f"{name:12s} decode {median:8.3f} tok/s [{min(rates):.3f}-{max(rates):.3f}]  "
            f"x{median / peer:.2f} vs accelerate  read {format_bytes(runs[0].get('bytes_read', 0))}  "
            f"prefetch hits {runs[0].get('prefetch_hit_rate', float('nan')):.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
