"""Human units for sizes and rates: "512MiB", "2GB", "100Gbit/s", "1.5GB/s"."""

from __future__ import annotations

import re

from shunter.errors import ShunterError

_BYTE_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_BIT_UNITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9, "tbit": 10**12}
_NUMBER = r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*"


def parse_bytes(text: str | int | float, field: str = "size") -> int:
    """Bytes from "512MiB", "2GB", "1e9" or a plain number; raises ShunterError naming `field`."""
    if isinstance(text, int | float):
        value = float(text)
    else:
        match = re.fullmatch(_NUMBER + r"([A-Za-z]*)\s*", str(text))
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _BYTE_UNITS:
            raise ShunterError(f"{field}: cannot read {text!r} as a size (examples: 512MiB, 2GB, 1073741824)")
        value = float(match.group(1)) * _BYTE_UNITS[unit]
    if value < 0:
        raise ShunterError(f"{field}: size must not be negative, got {text!r}")
    return int(value)


def parse_bandwidth(text: str | int | float, field: str = "bandwidth") -> float:
    """Bytes per second from "100Gbit/s", "12.5GB/s", "800MiB/s" or a plain number of bytes/s."""
    if isinstance(text, int | float):
        value = float(text)
    else:
        match = re.fullmatch(_NUMBER + r"([A-Za-z]*)\s*(?:/s|ps)?\s*", str(text))
        unit = match.group(2).lower() if match else None
        if match is None or (unit not in _BYTE_UNITS and unit not in _BIT_UNITS):
            raise ShunterError(
                f"{field}: cannot read {text!r} as a bandwidth (examples: 100Gbit/s, 12.5GB/s, 1e9)"
            )
        number = float(match.group(1))
        value = number * _BIT_UNITS[unit] / 8 if unit in _BIT_UNITS else number * _BYTE_UNITS[unit]
    if not value > 0:
        raise ShunterError(f"{field}: bandwidth must be positive, got {text!r}")
    return value


def format_bytes(num_bytes: float) -> str:
    """1536 -> '1.5 KiB'."""
    value = float(num_bytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
