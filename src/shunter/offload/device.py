"""Where the experts compute, and how streamed weights get there: the CPU in place, or a GPU.

On the CPU a weight read into a host buffer is already where compute happens. On a GPU the
I/O thread copies it out of pinned host memory on its own copy stream, so copies overlap the
compute stream's kernels; the compute stream waits for the copy's event on the device (Python
does not block), and each copied tensor is marked as used on the compute stream so that the
caching allocator does not hand its memory back to the copy stream while a kernel still reads it.

The same code runs on the CPU with `copies=True` (tests): torch's CPU streams and events are
no-ops with the CUDA interface, and the copy is a real copy into fresh memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch

from shunter.errors import FieldError
from shunter.model.weights import map_tensors

W = TypeVar("W")


def resolve_device(name: str | None) -> torch.device:
    """The device named 'cpu', 'cuda', 'cuda:N', or None/'auto' for the GPU when one is usable."""
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise FieldError("device", f"expected cpu, cuda, cuda:N or auto, got {name!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise FieldError("device", f"{name!r} is not supported (cpu or cuda)")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise FieldError("device", "this torch build or machine has no usable CUDA GPU", name)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise FieldError("device", f"only {torch.cuda.device_count()} CUDA device(s) here", name)
    return device


@dataclass
class Uploaded(Generic[W]):
    """Weights on the compute device; `event` marks the end of their copy (None: no copy made)."""

    weights: W
    event: Any = None


class ComputeDevice:
    """Moves weights from host memory to the device that computes on them."""

    def __init__(self, device: torch.device | str = "cpu", copies: bool | None = None) -> None:
        self.device = torch.device(device)
        self.copies = self.device.type != "cpu" if copies is None else copies
        self._module = torch.get_device_module(self.device.type) if self.copies else None
        # torch.cuda's stream calls name the device (cuda:1 copies on cuda:1); torch.cpu's take none
        self._on_device = (self.device,) if self.device.type == "cuda" else ()
        self._copy_stream = self._module.Stream(*self._on_device) if self._module is not None else None

    @property
    def pin_memory(self) -> bool:
        """Host buffers are page-locked when a GPU copies out of them (DMA without a bounce)."""
        return self.device.type == "cuda"

    def place(self, weights: W) -> W:
        """Resident weights: moved once, synchronously, at load time."""
        if not self.copies:
            return weights
        # a tensor already there (a tied LM head is the embedding) is not copied twice
        return map_tensors(weights, lambda t: t.to(self.device, copy=t.device.type == "cpu"))

    def upload(self, weights: W) -> Uploaded[W]:
        """On the I/O thread: copy weights to the device on the copy stream. Returns once the copy
        has read its source, so the host buffers can go back to their pool when this returns."""
        if self._module is None:
            return Uploaded(weights)
        with self._module.stream(self._copy_stream):
            moved = map_tensors(weights, lambda t: t.to(self.device, copy=True, non_blocking=True))
        event = self._module.Event()
        event.record(self._copy_stream)
        event.synchronize()
        return Uploaded(moved, event)

    def ready(self, uploaded: Uploaded[W]) -> W:
        """On the compute thread: the weights, usable by kernels queued on the current stream."""
        if uploaded.event is None or self._module is None:
            return uploaded.weights
        stream = self._module.current_stream(*self._on_device)
        stream.wait_event(uploaded.event)
        if self.device.type == "cuda":
            map_tensors(uploaded.weights, lambda t: t.record_stream(stream) or t)
        return uploaded.weights
