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


ACCELERATE = """
import json, sys, time, torch
from transformers import AutoModelForCausalLM
path, offload, new, cpu = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map="auto",
                                             max_memory={"cpu": cpu}, offload_folder=offload)
ids = torch.tensor([list(range(100, 116))])
times = []
class Clock:
    def put(self, _): times.append(time.perf_counter())
    def end(self): pass
with torch.inference_mode():
    out = model.generate(input_ids=ids, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                         streamer=Clock(), pad_token_id=0)
print(json.dumps({"decode_tok_s": (new - 1) / (times[-1] - times[1]), "prefill_s": times[1] - times[0],
                  "generated_ids": out[0, 16:].tolist()}))
"""


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--cap", default="1.6GB", help="memory cap of each contender's cgroup")
    parser.add_argument("--new-tokens", type=int, default=8)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench/offload.py needs root (memory cgroups, dropping the page cache)", file=sys.stderr)
        return 2
    cap = parse_bytes(args.cap)
    path = build_model(CACHE / "mixtral-like-3g-bf16")
    size = sum(p.stat().st_size for p in path.glob("*.safetensors"))
    print(
        f"model {path.name}: {format_bytes(size)} on disk; cap {format_bytes(cap)} per contender; "
        f"threads {torch.get_num_threads()}",
        flush=True,
    )
    offload_dir = CACHE / "accelerate-offload"
    ids = ",".join(map(str, PROMPT_IDS))
    contenders = {
        "shunter": [
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
            str(cap - 2**29),
            "--json",
        ],
        # the engine gets the cap less 512 MiB for the Python and torch runtime; accelerate keeps up to
        # `cpu` of weights in RAM and memory-maps the rest from its offload_folder
        "accelerate": [
            sys.executable,
            "-c",
            ACCELERATE,
            str(path),
            str(offload_dir),
            str(args.new_tokens),
            str(int(cap * 0.5)),
        ],
    }
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
                f"rep {rep} {name:10s} decode {output['decode_tok_s']:.3f} tok/s  peak {format_bytes(peak)}  "
                f"read {format_bytes(output.get('bytes_read', 0))}",
                flush=True,
            )
    ours = [r["decode_tok_s"] for r in results["shunter"]]
    theirs = [r["decode_tok_s"] for r in results["accelerate"]]
    same = results["shunter"][0]["generated_ids"] == results["accelerate"][0]["generated_ids"]
    print(
        f"decode tok/s median: shunter {statistics.median(ours):.3f} [{min(ours):.3f}-{max(ours):.3f}], "
        f"accelerate {statistics.median(theirs):.3f} [{min(theirs):.3f}-{max(theirs):.3f}], "
        f"ratio {statistics.median(ours) / statistics.median(theirs):.2f}x; same tokens: {same}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
