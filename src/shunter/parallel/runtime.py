"""Joining a process group the way torchrun (or `shunter cluster run`) sets it up, and turning a
failed collective into one clear line instead of a hang or a C++ backtrace."""

from __future__ import annotations

import contextlib
import faulthandler
import os
import sys
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist

from shunter.errors import FieldError, ShunterError

LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def init_from_environment(timeout_s: float, backend: str | None = None) -> tuple[int, int]:
    """Join the default process group from torchrun's variables; returns (rank, world size).

    backend: "gloo" or "nccl"; by default NCCL when CUDA is available, gloo otherwise. timeout_s
    bounds every collective: a peer that stops answering fails the call instead of hanging it."""
    missing = [name for name in LAUNCH_VARIABLES if name not in os.environ]
    if missing:
        raise ShunterError(
            f"{', '.join(missing)} not set: launch with torchrun (--nproc-per-node N) or "
            "`shunter cluster run --hosts N -- ...`"
        )
    if timeout_s <= 0:
        raise FieldError("timeout", f"must be positive, got {timeout_s}")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    global _timeout
    _timeout = timedelta(seconds=timeout_s)
    dist.init_process_group(backend, timeout=_timeout)
    return dist.get_rank(), dist.get_world_size()


_timeout: timedelta | None = None  # the collective timeout the default group was made with


def new_group(ranks: list[int] | None, backend: str) -> dist.ProcessGroup:
    """dist.new_group with the default group's collective timeout (when init_from_environment made
    it). Without one torch gives a new group its own default of 30 minutes, and a rank still
    connecting a group's pairs when a peer died waited that long (seen in open_links: a rank killed
    while its peer loaded the model left the peer there for 20 minutes)."""
    return dist.new_group(ranks, backend=backend, timeout=_timeout)


def run_rank(main: Callable[[], int]) -> int:
    """Run a rank's main; a ShunterError or a failed collective becomes one stderr line.

    Exit status: 0 on success, 2 for bad input, 1 when the group failed (a peer died, the network
    dropped, or a collective timed out): then the process exits at once, its group not torn down
    (a broken group's teardown can wait on the dead peer). Otherwise the group is destroyed."""
    rank = os.environ.get("RANK", "?")
    # A native abort (SIGABRT, SIGSEGV) still prints where each Python thread was.
    faulthandler.enable()
    finished = False
    try:
        status = main()
        finished = True
        return status
    except ShunterError as exc:
        print(f"shunter: error: rank {rank}: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:  # DistBackendError and friends derive from it
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(
            f"shunter: error: rank {rank}: a collective failed (a peer exited, the network dropped, or "
            f"the timeout passed): {first_line}",
            file=sys.stderr,
        )
        # The group is broken: tearing it down (or the interpreter's exit, which joins the backend's
        # threads) can wait on a peer that is gone. Everything this rank writes is closed by now
        # (the exception unwound its `with` blocks), so leave at once with the status.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    finally:
        if dist.is_initialized():
            if finished:  # every peer past its last collective before any group is torn down
                with contextlib.suppress(Exception):
                    dist.barrier()
            # Destroyed here, whatever the barrier did: a group left to the interpreter's teardown
            # can abort the process there ("terminate called without an active exception").
            with contextlib.suppress(Exception):
                dist.destroy_process_group()
