"""Lazy reader for safetensors checkpoints in Hugging Face layout (single file or sharded)."""

from __future__ import annotations

import io
import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from shunter.errors import ShunterError

_SAFETENSORS_DTYPES = {
    "F32": torch.float32,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


@dataclass(frozen=True)
class TensorLocation:
    """Where one tensor's bytes are: file, absolute byte range [start, end), dtype and shape."""

    file: Path
    start: int
    end: int
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def num_bytes(self) -> int:
        return self.end - self.start

    def row(self, index: int) -> TensorLocation:
        """The byte range of tensor[index] (rows of a C-contiguous tensor are contiguous)."""
        row_bytes = self.num_bytes // self.shape[0]
        start = self.start + index * row_bytes
        return TensorLocation(self.file, start, start + row_bytes, self.dtype, self.shape[1:])


class Checkpoint:
    """Names, shapes and byte offsets of every tensor, read from the headers only.

    Tensor data is read on demand by `read(name)`; nothing is loaded at construction, so a
    checkpoint larger than memory can be opened. Headers are validated against file sizes,
    which catches truncated files before any compute starts.
    """

    def __init__(self, model_dir: str | Path) -> None:
        self.model_dir = Path(model_dir)
        self.locations: dict[str, TensorLocation] = {}
        for file in self._files():
            self.locations.update(_read_header(file))
        self._handles: dict[Path, io.FileIO] = {}  # opened on first read

    def _files(self) -> list[Path]:
        index = self.model_dir / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ShunterError(
                    f"{index}: not a safetensors index (needs a 'weight_map'): {exc}"
                ) from None
            files = sorted({self.model_dir / name for name in weight_map.values()})
            for file in files:
                if not file.is_file():
                    raise ShunterError(f"{index}: names shard {file.name}, which is missing")
            return files
        single = self.model_dir / SINGLE_FILE
        if single.is_file():
            return [single]
        others = sorted(self.model_dir.glob("*.safetensors"))
        if others:
            return others
        raise ShunterError(f"{self.model_dir}: no {SINGLE_FILE}, {INDEX_FILE} or *.safetensors file")

    def __contains__(self, name: str) -> bool:
        return name in self.locations

    def names(self) -> list[str]:
        return list(self.locations)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.location(name).shape

    def location(self, name: str) -> TensorLocation:
        try:
            return self.locations[name]
        except KeyError:
            raise ShunterError(f"{self.model_dir}: tensor {name!r} is missing from the checkpoint") from None

    def checked_location(self, name: str, expected_shape: tuple[int, ...]) -> TensorLocation:
        loc = self.location(name)
        if tuple(loc.shape) != tuple(expected_shape):
            raise ShunterError(
                f"{loc.file}: tensor {name!r} has shape {list(loc.shape)}, expected {list(expected_shape)} "
                "from config.json"
            )
        return loc

    def read(self, name: str, expected_shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """Load one tensor (a copy in memory). Checks its shape when `expected_shape` is given."""
        loc = self.location(name) if expected_shape is None else self.checked_location(name, expected_shape)
        if expected_shape is not None and not loc.dtype.is_floating_point:
            # a weight in int32 or bool would be cast to the compute dtype and change every token
            raise ShunterError(
                f"{loc.file}: tensor {name!r} is {str(loc.dtype).removeprefix('torch.')}, "
                "expected floating-point weights"
            )
        return self.read_location(loc, name)

    def read_location(self, loc: TensorLocation, name: str = "") -> torch.Tensor:
        """The bytes of `loc` as a tensor of its dtype and shape, read straight into fresh memory.

        Read with pread rather than through a memory map: a map keeps every page it touched in the
        process's resident set (file-backed) beside the copy, which doubles a loaded model's RSS."""
        out = torch.empty(loc.num_bytes, dtype=torch.uint8)
        handle = self._handles.get(loc.file)
        try:
            if handle is None:
                handle = self._handles[loc.file] = io.FileIO(loc.file, "r")
            view, done = memoryview(out.numpy()), 0
            while done < loc.num_bytes:
                got = os.preadv(handle.fileno(), [view[done:]], loc.start + done)
                if got <= 0:
                    raise OSError(f"file ended at byte {loc.start + done}")
                done += got
        except OSError as exc:
            raise ShunterError(f"{loc.file}: cannot read tensor {name or 'bytes'!r}: {exc}") from None
        return out.view(loc.dtype).reshape(loc.shape)

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()


def _read_header(file: Path) -> dict[str, TensorLocation]:
    """Parse one safetensors header and check every tensor's byte range lies inside the file."""
    size = os.path.getsize(file)
    with open(file, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ShunterError(f"{file}: truncated safetensors file ({size} bytes, no header)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > size - 8:
            raise ShunterError(
                f"{file}: truncated safetensors file (header says {header_len} bytes, file has {size})"
            )
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ShunterError(f"{file}: corrupt safetensors header ({exc})") from None
    data_start = 8 + header_len
    locations = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = (int(x) for x in entry["data_offsets"])
            dtype = _SAFETENSORS_DTYPES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
        except (KeyError, TypeError, ValueError):
            raise ShunterError(f"{file}: corrupt header entry for tensor {name!r}: {entry!r}") from None
        if data_start + end > size:
            raise ShunterError(
                f"{file}: truncated safetensors file: tensor {name!r} ends at byte {data_start + end}, "
                f"the file has {size} bytes"
            )
        expected_bytes = math.prod(shape) * dtype.itemsize
        if end - begin != expected_bytes:
            raise ShunterError(
                f"{file}: corrupt header entry for tensor {name!r}: {end - begin} bytes for shape "
                f"{list(shape)} of {entry['dtype']} ({expected_bytes} bytes)"
            )
        locations[name] = TensorLocation(file, data_start + begin, data_start + end, dtype, shape)
    return locations
