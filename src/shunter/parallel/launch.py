"""Launch one rank per host of an emulated cluster the way torchrun does, stream each rank's output
prefixed with its host, and stop every rank (and whatever it started) on failure or interrupt."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import IO, TextIO

from shunter.errors import ShunterError
from shunter.parallel.cluster import DEFAULT_PORT, EmulatedCluster, _Signals

DEFAULT_GRACE_S = 60.0
# After SIGTERM, a rank's process group gets this long before SIGKILL.
TERM_WAIT_S = 5.0


def run_on_cluster(
    cluster: EmulatedCluster,
    command: Sequence[str],
    port: int = DEFAULT_PORT,
    grace_s: float = DEFAULT_GRACE_S,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Run `command` once per host of an entered cluster, rank i on host i, with torchrun's
    variables (EmulatedCluster.rank_environment); returns an exit status for the whole run.

    Each rank's stdout goes to `out` and its stderr to `err` (default: this process's), line by line
    as it comes, prefixed '[host i] '; line order is kept within each stream of a rank. 0 when every
    rank exits 0; otherwise the status of the first rank to fail (128 + N for signal N), after one
    line on `err` naming it. When a rank fails the others get grace_s seconds to exit on their own
    (their peer is gone, so they usually fail too), then SIGTERM and, TERM_WAIT_S later, SIGKILL.
    Every rank runs in its own session; whatever is left in it is killed the same way on the way out,
    including on ClusterInterrupted."""
    if not command:
        raise ShunterError("COMMAND: nothing to run; give it after `--`, e.g. -- python train.py")
    if not cluster.namespaces:
        raise ShunterError("run_on_cluster: no cluster; call it inside `with EmulatedCluster(...)`")
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    lock = threading.Lock()
    ranks: list[subprocess.Popen[bytes]] = []
    pumps: list[threading.Thread] = []
    try:
        with _Signals.hold(raise_after=True):  # an interrupt mid-spawn would lose a process
            for rank, namespace in enumerate(cluster.namespaces):
                env = {**os.environ, **cluster.rank_environment(rank, port)}
                env.setdefault("PYTHONUNBUFFERED", "1")  # so a Python rank's prints stream live
                # The hosts share this machine's cores: as torchrun does for several ranks on one
                # machine, size each rank's OpenMP team to its share, or every rank's team of all
                # cores spins against the others' (and starves the collectives' threads).
                env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // cluster.num_hosts)))
                try:
                    proc = subprocess.Popen(
                        ["ip", "netns", "exec", namespace, *command],
                        env=env,
                        stdin=subprocess.DEVNULL,
                        stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE,
                        start_new_session=True,
                    )
                except OSError as exc:
                    raise ShunterError(f"could not start rank {rank}: {exc}") from None
                ranks.append(proc)
                prefix = f"[host {rank}] "
                assert proc.stdout is not None and proc.stderr is not None
                for stream, sink in ((proc.stdout, out), (proc.stderr, err)):
                    pump = threading.Thread(target=_pump, args=(stream, sink, prefix, lock), daemon=True)
                    pump.start()
                    pumps.append(pump)
        status, message = _wait_for_ranks(ranks, grace_s)
    finally:
        with _Signals.hold(raise_after=False):
            _stop(ranks)
            for pump in pumps:
                pump.join(timeout=2.0)  # a pipe a killed-off grandchild held open may stay open
    if message:
        with lock:
            err.write(f"shunter: {message}\n")
            err.flush()
    return status


def _wait_for_ranks(ranks: list[subprocess.Popen[bytes]], grace_s: float) -> tuple[int, str]:
    """Wait for every rank; returns (exit status, a line about the first failure or '')."""
    first: tuple[int, int] | None = None  # (host, returncode)
    deadline = float("inf")
    while True:
        codes = [proc.poll() for proc in ranks]
        if first is None:
            failed = [(host, code) for host, code in enumerate(codes) if code not in (None, 0)]
            if failed:
                first = failed[0]
                deadline = time.monotonic() + grace_s
        if all(code is not None for code in codes):
            break
        if time.monotonic() >= deadline:
            late = [host for host, code in enumerate(codes) if code is None]
            _stop([ranks[host] for host in late])
            assert first is not None
            host, code = first
            return _status(code), (
                f"host {host} {_describe(code)}; killed host{'s' * (len(late) > 1)} "
                f"{', '.join(map(str, late))}, still running {grace_s:g} s later"
            )
        time.sleep(0.05)
    if first is None:
        return 0, ""
    host, code = first
    return _status(code), f"host {host} {_describe(code)}"


def _stop(ranks: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM each rank's process group, SIGKILL what is left TERM_WAIT_S later, reap the ranks."""
    for proc in ranks:
        proc.poll()
        _signal_group(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + TERM_WAIT_S
    while time.monotonic() < deadline and any(_group_alive(proc) for proc in ranks):
        time.sleep(0.02)
    for proc in ranks:
        _signal_group(proc.pid, signal.SIGKILL)
        proc.wait()


def _group_alive(proc: subprocess.Popen[bytes]) -> bool:
    """Whether anything but zombies is left in a rank's process group. Zombies do not count: an
    orphan is a zombie until init reaps it, which some container inits do only now and then."""
    proc.poll()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as file:
                stat = file.read()
        except OSError:
            continue
        state, _, pgrp = stat[stat.rindex(")") + 2 :].split()[:3]  # after "pid (comm) "
        if int(pgrp) == proc.pid and state not in ("Z", "X"):
            return True
    return False


def _signal_group(pgid: int, signum: int) -> bool:
    """Send signum to a process group; False when the group no longer exists."""
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _pump(stream: IO[bytes], sink: TextIO, prefix: str, lock: threading.Lock) -> None:
    """Copy a rank's pipe to sink line by line, each line prefixed."""
    with stream:
        for raw in iter(stream.readline, b""):
            line = raw.decode(errors="replace")
            with lock:
                sink.write(prefix + line + ("" if line.endswith("\n") else "\n"))
                sink.flush()


def _status(returncode: int) -> int:
    """A rank's returncode as a shell exit status: 128 + N when killed by signal N."""
    return 128 - returncode if returncode < 0 else returncode


def _describe(returncode: int) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"was killed by {name} (status {128 - returncode})"
    return f"failed with exit status {returncode}"
