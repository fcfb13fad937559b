"""Read tensors from safetensors files without the page cache: O_DIRECT into aligned buffers.

The page cache would be a hidden extra tier: a benchmark that "streams from disk" while the
kernel keeps every byte in RAM measures RAM. With O_DIRECT the bytes come from the device each
time. Where O_DIRECT is refused (some filesystems), plain pread is used and the pages are
dropped after each read with posix_fadvise(DONTNEED).
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from shunter.errors import ShunterError
from shunter.model.checkpoint import TensorLocation

ALIGNMENT = 4096  # O_DIRECT needs offset, length and buffer address aligned to the block size
POOLED_MIN_BYTES = 1 << 20  # smaller reads (norms, biases) take fresh memory: faulting them in is cheap
POOL_GRANULE = 64 << 10  # pooled capacities are rounded up to this, so near-equal sizes share buffers

Allocate = Callable[[int], torch.Tensor]  # nbytes -> a page-aligned uint8 tensor of that length


@dataclass
class ReadStats:
    bytes_read: int = 0  # bytes of tensors delivered
    bytes_transferred: int = 0  # bytes moved from the device, including alignment padding
    reads: int = 0
    seconds: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, delivered: int, transferred: int, seconds: float) -> None:
        with self.lock:
            self.bytes_read += delivered
            self.bytes_transferred += transferred
            self.reads += 1
            self.seconds += seconds


class DirectReader:
    """Reads byte ranges of checkpoint files, bypassing the page cache when it can.

    Thread-safe: each read uses positional I/O on a shared descriptor.
    """

    def __init__(self, use_direct_io: bool = True) -> None:
        self.use_direct_io = use_direct_io
        self._fds: dict[Path, tuple[int, bool]] = {}
        self._lock = threading.Lock()
        self.stats = ReadStats()

    def _open(self, file: Path) -> tuple[int, bool]:
        with self._lock:
            if file not in self._fds:
                direct = False
                fd = -1
                if self.use_direct_io and hasattr(os, "O_DIRECT"):
                    try:
                        fd = os.open(file, os.O_RDONLY | os.O_DIRECT)
                        direct = True
                    except OSError:
                        fd = -1
                if fd < 0:
                    try:
                        fd = os.open(file, os.O_RDONLY)
                    except OSError as exc:
                        raise ShunterError(f"{file}: cannot open checkpoint file: {exc.strerror}") from None
                self._fds[file] = (fd, direct)
            return self._fds[file]

    def read(self, loc: TensorLocation, allocate: Allocate | None = None) -> torch.Tensor:
        """Read one tensor (or one row range of it) into memory that the tensor owns: fresh memory,
        or a page-aligned buffer from `allocate` (a HostBufferPool's `take`)."""
        started = time.perf_counter()
        fd, direct = self._open(loc.file)
        begin = (loc.start // ALIGNMENT) * ALIGNMENT if direct else loc.start
        end = _round_up(loc.end) if direct else loc.end
        length = end - begin
        storage = (allocate or aligned_empty)(length)
        target = memoryview(storage.numpy())
        got = 0
        try:
            while got < length:
                n = os.preadv(fd, [target[got:]], begin + got)
                if n == 0:
                    break
                got += n
        except OSError as exc:
            raise ShunterError(f"{loc.file}: read failed at byte {begin + got}: {exc.strerror}") from None
        if got < loc.end - begin:
            raise ShunterError(
                f"{loc.file}: file ended at byte {begin + got} while reading a tensor that ends at {loc.end} "
                "(was it truncated or replaced while running?)"
            )
        if not direct and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, begin, length, os.POSIX_FADV_DONTNEED)
        self.stats.add(loc.num_bytes, got, time.perf_counter() - started)
        first = loc.start - begin
        return storage[first : first + loc.num_bytes].view(loc.dtype).view(loc.shape)

    def close(self) -> None:
        with self._lock:
            for fd, _ in self._fds.values():
                os.close(fd)
            self._fds.clear()


def aligned_empty(nbytes: int, pin_memory: bool = False) -> torch.Tensor:
    """A fresh uint8 tensor of nbytes at a page-aligned address (one allocation, with room to
    start inside it at a page boundary)."""
    fresh = torch.empty(nbytes + ALIGNMENT, dtype=torch.uint8, pin_memory=pin_memory)
    shift = (-fresh.data_ptr()) % ALIGNMENT
    return fresh[shift : shift + nbytes]


class HostBufferPool:
    """Page-aligned host buffers reused from read to read; pinned when a GPU copies out of them.

    Fresh memory for every streamed tensor costs a page fault and a zeroed page per 4 KiB, on the
    same cores the experts compute on: reading 880 MB of experts took 0.135 s of CPU into fresh
    memory against 0.053 s into reused buffers (measured here). A buffer returns to the pool when
    the last tensor viewing it is freed, so the pool holds at most what was ever alive at once
    (the pipeline's window bounds that), per size. Reads under POOLED_MIN_BYTES take fresh memory.
    """

    def __init__(self, pin_memory: bool = False) -> None:
        self.pin_memory = pin_memory
        self.min_bytes = POOLED_MIN_BYTES
        self._free: dict[int, list[torch.Tensor]] = {}
        self._lock = threading.Lock()
        self.allocated_bytes = 0  # all buffers ever made (alive or free): the pool's footprint

    def take(self, nbytes: int) -> torch.Tensor:
        """A uint8 tensor of nbytes at a page-aligned address; its memory comes back on free."""
        if nbytes < self.min_bytes:
            return aligned_empty(nbytes, self.pin_memory)
        capacity = -(-nbytes // POOL_GRANULE) * POOL_GRANULE
        with self._lock:
            free = self._free.get(capacity)
            buffer = free.pop() if free else None
            if buffer is None:
                self.allocated_bytes += capacity + ALIGNMENT
        if buffer is None:
            buffer = torch.empty(capacity + ALIGNMENT, dtype=torch.uint8, pin_memory=self.pin_memory)
        shift = (-buffer.data_ptr()) % ALIGNMENT
        # a numpy view owns the handed-out tensor's memory: when the last tensor on it is freed,
        # the view is, and the finalizer gives the buffer back
        view = buffer.numpy()[shift : shift + nbytes]
        finalizer = weakref.finalize(view, self._give_back, capacity, buffer)
        finalizer.atexit = False
        return torch.from_numpy(view)

    def _give_back(self, capacity: int, buffer: torch.Tensor) -> None:
        with self._lock:
            self._free.setdefault(capacity, []).append(buffer)

    def free_bytes(self) -> int:
        with self._lock:
            return sum((capacity + ALIGNMENT) * len(free) for capacity, free in self._free.items())


def _round_up(n: int) -> int:
    return -(-n // ALIGNMENT) * ALIGNMENT
