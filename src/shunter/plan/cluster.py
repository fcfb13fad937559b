"""ClusterSpec: the devices a plan runs on (port bandwidth, compute speed, memory), read from TOML.

    # cluster.toml
    name = "four A100 and four L40S"          # optional

    [[devices]]
    name = "a100"                             # with count > 1: a100-0, a100-1, ...
    count = 4                                 # optional, default 1
    bandwidth = "100Gbit/s"                   # full-duplex port: each direction at this rate
    compute = "312TFLOP/s"                    # optional, default 100TFLOP/s
    memory = "80GiB"                          # optional, default 80GiB

Every field error names the file, the device entry and the field.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shunter.errors import ShunterError
from shunter.files import read_text_input
from shunter.units import format_bytes, parse_bandwidth, parse_bytes, parse_compute

DEFAULT_COMPUTE = "100TFLOP/s"
DEFAULT_MEMORY = "80GiB"
MAX_DEVICES = 4096  # an expert-parallel group far beyond today's (hundreds of devices)
_DEVICE_KEYS = {"name", "count", "bandwidth", "compute", "memory"}


@dataclass(frozen=True)
class Device:
    """One accelerator: its network port (bytes/s, each direction), compute (FLOP/s) and memory (bytes)."""

    name: str
    bandwidth_bytes_s: float
    compute_flop_s: float
    memory_bytes: int


@dataclass(frozen=True)
class ClusterSpec:
    """The devices of a cluster behind one non-blocking switch."""

    devices: tuple[Device, ...]
    name: str = ""

    @property
    def num_devices(self) -> int:
        return len(self.devices)

    @property
    def bandwidth_bytes_s(self) -> np.ndarray:
        """[n] port bandwidth of each device."""
        return np.array([d.bandwidth_bytes_s for d in self.devices], dtype=np.float64)

    @property
    def compute_flop_s(self) -> np.ndarray:
        """[n] compute speed of each device."""
        return np.array([d.compute_flop_s for d in self.devices], dtype=np.float64)

    @property
    def memory_bytes(self) -> np.ndarray:
        """[n] memory of each device."""
        return np.array([d.memory_bytes for d in self.devices], dtype=np.int64)

    @property
    def is_homogeneous(self) -> bool:
        """Every device has the same bandwidth and compute."""
        first = self.devices[0]
        return all(
            d.bandwidth_bytes_s == first.bandwidth_bytes_s and d.compute_flop_s == first.compute_flop_s
            for d in self.devices
        )

    @classmethod
    def uniform(
        cls,
        num_devices: int,
        bandwidth_bytes_s: float,
        compute_flop_s: float = 1e14,
        memory_bytes: int = 80 * 2**30,
    ) -> ClusterSpec:
        """num_devices identical devices (for experiments and tests)."""
        return cls(
            tuple(
                Device(f"dev{i}", float(bandwidth_bytes_s), float(compute_flop_s), int(memory_bytes))
                for i in range(num_devices)
            )
        )

    def to_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "devices": [
                {
                    "name": d.name,
                    "bandwidth_bytes_s": d.bandwidth_bytes_s,
                    "compute_flop_s": d.compute_flop_s,
                    "memory_bytes": d.memory_bytes,
                }
                for d in self.devices
            ],
        }


def parse_cluster(document: dict[str, object], source: str = "cluster") -> ClusterSpec:
    """A ClusterSpec from a parsed TOML document; `source` (the file) starts every error message."""
    entries = document.get("devices")
    if not isinstance(entries, list) or not entries:
        raise ShunterError(f"{source}: expected one or more [[devices]] tables")
    unknown_top = set(document) - {"devices", "name"}
    if unknown_top:
        raise ShunterError(
            f"{source}: unknown top-level field {sorted(unknown_top)[0]!r} (expected devices, name)"
        )
    devices: list[Device] = []
    for index, entry in enumerate(entries):
        where = f"{source}: devices[{index}]"
        if not isinstance(entry, dict):
            raise ShunterError(f"{where}: expected a table with bandwidth, compute and memory")
        unknown = set(entry) - _DEVICE_KEYS
        if unknown:
            raise ShunterError(
                f"{where}: unknown field {sorted(unknown)[0]!r} (expected {', '.join(sorted(_DEVICE_KEYS))})"
            )
        if "bandwidth" not in entry:
            raise ShunterError(f"{where}.bandwidth: missing (the port bandwidth, e.g. '100Gbit/s')")
        count = entry.get("count", 1)
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ShunterError(f"{where}.count: expected a positive integer, got {count!r}")
        total = len(devices) + count
        if total > MAX_DEVICES:
            raise ShunterError(
                f"{where}.count: {total} devices in all, more than the {MAX_DEVICES} a plan can hold "
                f"(each n x n traffic matrix would need {format_bytes(8 * total**2)})"
            )
        name = entry.get("name", f"dev{index}")
        if not isinstance(name, str) or not name:
            raise ShunterError(f"{where}.name: expected a non-empty string, got {name!r}")
        bandwidth = parse_bandwidth(_scalar(entry["bandwidth"], f"{where}.bandwidth"), f"{where}.bandwidth")
        compute = parse_compute(
            _scalar(entry.get("compute", DEFAULT_COMPUTE), f"{where}.compute"), f"{where}.compute"
        )
        memory = parse_bytes(
            _scalar(entry.get("memory", DEFAULT_MEMORY), f"{where}.memory"), f"{where}.memory"
        )
        if memory <= 0:
            raise ShunterError(f"{where}.memory: must be positive, got {entry.get('memory')!r}")
        names = [name] if count == 1 else [f"{name}-{k}" for k in range(count)]
        devices.extend(Device(device_name, bandwidth, compute, memory) for device_name in names)
    seen: set[str] = set()
    for device in devices:
        if device.name in seen:
            raise ShunterError(f"{source}: device name {device.name!r} appears twice")
        seen.add(device.name)
    cluster_name = document.get("name", "")
    if not isinstance(cluster_name, str):
        raise ShunterError(f"{source}: name must be a string")
    return ClusterSpec(tuple(devices), cluster_name)


def load_cluster(path: str | Path) -> ClusterSpec:
    """Read a cluster TOML file (see the module docstring for the format)."""
    text = read_text_input(path, "cluster", "TOML")
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ShunterError(f"{path}: not valid TOML: {exc}") from None
    return parse_cluster(document, str(path))


def _scalar(value: object, field: str) -> str | int | float:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ShunterError(f"{field}: expected a string like '100Gbit/s' or a number, got {value!r}")
    return value
