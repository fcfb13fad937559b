"""One benchmark run in a fresh worker process inside a fresh cgroup-v1 memory cgroup.

The cap counts the page cache too, so weights that "stream from disk" really come from the disk;
the page cache is dropped before every run, and the run's cgroup is removed after it, also on
failure and Ctrl-C. Peak = the cgroup's memory.max_usage_in_bytes. Needs root.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shunter.errors import ShunterError
from shunter.units import format_bytes

MEMORY_CGROUP_ROOT = Path("/sys/fs/cgroup/memory")
CGROUP_PREFIX = "shunter-bench-"
WORKER_MODULE = "shunter.bench.workers"  # `python -m WORKER_MODULE JOB.json RESULT.json`
# jobs whose worker is another module: llama.cpp's imports no torch, whose memory would count
WORKER_MODULES = {"llama.cpp": "shunter.bench.llama"}


def own_memory_cgroup() -> Path | None:
    """This process's cgroup-v1 memory cgroup directory; None when there is no v1 memory controller."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            group = MEMORY_CGROUP_ROOT / path.lstrip("/")
            return group if (group / "memory.max_usage_in_bytes").is_file() else None
    return None


def check_environment() -> Path:
    """The memory cgroup to make run cgroups under; ShunterError unless root with cgroup-v1 memory."""
    if os.geteuid() != 0:
        raise ShunterError(
            "shunter bench offload needs root (memory cgroups, dropping the page cache); run it with sudo"
        )
    group = own_memory_cgroup()
    if group is None:
        raise ShunterError(
            f"shunter bench offload needs the cgroup v1 memory controller ({MEMORY_CGROUP_ROOT}), "
            "which caps page cache and process memory together; this machine has none"
        )
    return group


def drop_page_cache() -> None:
    """Write dirty pages back and drop the clean ones, so the next run reads from the device."""
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


_group_numbers = itertools.count()


@contextlib.contextmanager
def memory_cgroup(cap_bytes: int | None) -> Iterator[Path]:
    """A fresh memory cgroup under this process's, capped at cap_bytes (None: no cap, just
    measured); removed on exit, after killing whatever is still in it."""
    parent = own_memory_cgroup()
    if parent is None:
        raise ShunterError(f"no cgroup v1 memory controller at {MEMORY_CGROUP_ROOT}")
    group = parent / f"{CGROUP_PREFIX}{os.getpid()}-{next(_group_numbers)}"
    group.mkdir()
    try:
        if cap_bytes is not None:
            (group / "memory.limit_in_bytes").write_text(str(cap_bytes))
        yield group
    finally:
        _remove_cgroup(group)


def _remove_cgroup(group: Path) -> None:
    # only the run's own process tree can be in it: a worker that outlived an interrupt
    deadline = time.monotonic() + 10.0
    while True:
        pids = [int(p) for p in (group / "cgroup.procs").read_text().split()]
        if not pids:
            try:
                group.rmdir()
                return
            except OSError:  # EBUSY for a moment after the last process exits
                pass
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            print(f"shunter: warning: could not remove the cgroup {group}", file=sys.stderr)
            return
        time.sleep(0.02)


class RunTimedOut(ShunterError):
    """A worker ran past its time limit and was killed (a contender thrashing under the cap)."""


@dataclass(frozen=True)
class CappedRun:
    result: dict[str, Any]  # what the worker wrote
    peak_cgroup_bytes: int  # memory.max_usage_in_bytes: processes + page cache, at the highest
    wall_s: float  # the process, start to exit


def run_capped(
    job: dict[str, Any], cap_bytes: int | None, label: str, timeout_s: float | None = None
) -> CappedRun:
    """Run one job in a fresh worker process in a fresh memory cgroup capped at cap_bytes, with the
    page cache dropped first. ShunterError (the worker's output tail on stderr) when it fails;
    RunTimedOut when it runs past timeout_s (the worker is killed with the cgroup)."""
    with tempfile.TemporaryDirectory(prefix="shunter-bench-") as scratch:
        job_path, result_path = Path(scratch) / "job.json", Path(scratch) / "result.json"
        job_path.write_text(json.dumps(job))
        module = WORKER_MODULES.get(job.get("kind", ""), WORKER_MODULE)
        argv = [sys.executable, "-m", module, str(job_path), str(result_path)]
        drop_page_cache()
        with memory_cgroup(cap_bytes) as group:
            procs = str(group / "cgroup.procs")

            def enter() -> None:  # in the child, before exec: everything it maps counts
                with open(procs, "w") as f:
                    f.write(str(os.getpid()))

            started = time.perf_counter()
            try:
                done = subprocess.run(
                    argv, preexec_fn=enter, capture_output=True, text=True, timeout=timeout_s
                )
            except subprocess.TimeoutExpired:
                raise RunTimedOut(f"{label}: no result within {timeout_s:g} s; killed") from None
            wall_s = time.perf_counter() - started
            peak = int((group / "memory.max_usage_in_bytes").read_text())
            oom_kills = _oom_kills(group)
        if done.returncode != 0:
            sys.stderr.write(done.stderr[-3000:])
            why = f"exit status {done.returncode}"
            if oom_kills or done.returncode == -signal.SIGKILL:
                why += f", killed at the memory cap (peak {format_bytes(peak)}): raise --memory"
            raise ShunterError(f"{label} failed ({why}); its last output is above")
        return CappedRun(json.loads(result_path.read_text()), peak, wall_s)


def _oom_kills(group: Path) -> int:
    with contextlib.suppress(OSError):
        for line in (group / "memory.oom_control").read_text().splitlines():
            if line.startswith("oom_kill "):
                return int(line.split()[1])
    return 0
