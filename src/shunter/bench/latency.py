"""The per-message latency of a process group, measured the way the simulators charge it.

`python -m shunter.bench.latency OUT.json` on every rank (torchrun, or `shunter cluster run` on the
emulated cluster): after a barrier, a ring all-gather of a few int64 per rank, 12 times; rank 0
writes {"all_gather_s": median of the slowest rank, "message_latency_s": that over the ring's
n - 1 steps}. The simulators' `latency_s` is this: every flow idles that long before its bytes
move (gloo's and the TCP stack's start-up per message, on this machine's shared cores).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from shunter.files import atomic_output
from shunter.parallel.runtime import init_from_environment, run_rank


def ring_message_latency_s(group=None, values: int = 8, reps: int = 12) -> tuple[float, float]:
    """(all-gather seconds, per-message seconds) over `group`: the median of `reps` all-gathers of
    `values` int64 per rank (the slowest rank's), and that over the ring's n - 1 steps."""
    n = dist.get_world_size(group)
    mine = torch.zeros(values, dtype=torch.int64)
    gathered = [torch.empty_like(mine) for _ in range(n)]
    seconds = []
    for _ in range(reps):
        dist.barrier(group)
        started = time.perf_counter()
        dist.all_gather(gathered, mine, group=group)
        seconds.append(time.perf_counter() - started)
    slowest = torch.tensor([float(np.median(seconds))], dtype=torch.float64)
    dist.all_reduce(slowest, dist.ReduceOp.MAX, group=group)
    all_gather_s = float(slowest)
    return all_gather_s, all_gather_s / max(n - 1, 1)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m shunter.bench.latency OUT.json", file=sys.stderr)
        return 2
    rank, _ = init_from_environment(timeout_s=120.0, backend="gloo")
    all_gather_s, latency_s = ring_message_latency_s()
    if rank == 0:
        with atomic_output(Path(argv[0])) as f:
            f.write(json.dumps({"all_gather_s": all_gather_s, "message_latency_s": latency_s}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(run_rank(main))
