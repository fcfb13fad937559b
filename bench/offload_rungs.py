"""Chosen rungs of the offload ladder at one S, interleaved, more repetitions than the full bench.

Where two rungs differ by less than the disk's run-to-run noise (hot-prefetch and reorder at 8
sequences: both read-bound, reading nearly the same experts), the full `shunter bench offload`
table's median of 5 cannot order them. This runs only those rungs, the same way (own process,
fresh memory cgroup at the same cap, page cache dropped first), alternating, and prints medians
and the paired per-round ratios. Needs root.

    sudo .venv/bin/python bench/offload_rungs.py .bench_cache/mixtral-like-3g-bf16 --memory 1.6GB \
        --sequences 8 --rungs hot-prefetch,reorder --reps 9
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
from pathlib import Path

from shunter.bench.sandbox import check_environment, run_capped
from shunter.units import parse_bytes

RUNGS = {  # name -> (prefetch, hot_first), as in shunter.bench.offload
    "multi-batch": ("layer", False),
    "hot-prefetch": ("hot", False),
    "reorder": ("hot", True),
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", type=Path)
    p.add_argument("--memory", required=True, help="the cgroup cap, as `shunter bench offload --memory`")
    p.add_argument("--runtime-reserve", default="768MiB", help="of the cap, left to the runtime")
    p.add_argument("--sequences", type=int, default=8, help="S; one sequence per micro-batch (n = S)")
    p.add_argument("--rungs", default="hot-prefetch,reorder")
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--json", type=Path, help="also write the rates here")
    args = p.parse_args()
    check_environment()
    cap = parse_bytes(args.memory, "--memory")
    budget = cap - parse_bytes(args.runtime_reserve, "--runtime-reserve")
    rungs = args.rungs.split(",")
    unknown = [r for r in rungs if r not in RUNGS]
    if unknown:
        p.error(f"--rungs: unknown {', '.join(unknown)}; choose from {', '.join(RUNGS)}")
    rates: dict[str, list[float]] = {r: [] for r in rungs}
    runs: dict[str, list[dict]] = {r: [] for r in rungs}  # each run's result, less its tokens
    for round_number in range(args.warmup + args.reps):
        for rung in rungs:
            prefetch, hot_first = RUNGS[rung]
            job = {
                "kind": "shunter", "model": str(args.model), "memory_bytes": budget,
                "new_tokens": args.new_tokens, "sequences": args.sequences,
                "num_batches": args.sequences, "prefetch": prefetch, "hot_first": hot_first,
            }  # fmt: skip
            run = run_capped(job, cap, f"{rung} S={args.sequences}")
            tok_s = run.result["decode_tok_s"]
            which = "warm-up" if round_number < args.warmup else f"rep {round_number - args.warmup + 1}"
            read_gib = run.result["bytes_read"] / 2**30
            disk, busy = run.result["decode_disk_bytes_s"], run.result["decode_io_busy"]
            print(
                f"{rung:<13} {which:>8}: {tok_s:8.3f} tok/s, read {read_gib:.1f} GiB, decode reads at "
                f"{(disk or 0) / 1e9:.2f} GB/s, I/O thread busy {busy or 0:.0%}",
                file=sys.stderr,
                flush=True,
            )
            if round_number >= args.warmup:
                rates[rung].append(tok_s)
                runs[rung].append({k: v for k, v in run.result.items() if k != "generated_ids"})
    for rung in rungs:
        values = rates[rung]
        print(
            f"{rung:<13} median {statistics.median(values):.3f} tok/s ({min(values):.3f}-{max(values):.3f})"
        )
    for before, after in itertools.pairwise(rungs):
        paired = [b / a for a, b in zip(rates[before], rates[after], strict=True)]
        wins = sum(r > 1 for r in paired)
        print(
            f"{after} / {before}, same round: median {statistics.median(paired):.3f}, "
            f"higher in {wins} of {len(paired)}"
        )
    if args.json:
        args.json.write_text(
            json.dumps({"sequences": args.sequences, "rates": rates, "runs": runs}, indent=1)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
