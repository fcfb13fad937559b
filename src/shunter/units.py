"""User-facing values, read and checked in one place: sizes ("512MiB", "2GB"), rates ("100Gbit/s",
"12.5GB/s"), durations ("5ms"), compute speeds ("312TFLOP/s") and plain numbers.

Units follow the usual conventions and are case-sensitive where case carries meaning: B is a byte,
b a bit (so "100Gb/s" and "100Gbps" are bits, "12.5GB/s" bytes); k/K, M, G, T are powers of ten
and Ki, Mi, Gi, Ti powers of two. A spelling that could mean either ("100gb", "10mb/s") is an error
that lists the accepted ones, never a guess. Every value must be finite; each parser names the
`field` it reads (a file's key or a flag) in its one-line error.
"""

from __future__ import annotations

import argparse
import math
import os
import re
from collections.abc import Callable
from typing import Any

from shunter.errors import ShunterError

_NUMBER = r"\s*([-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?)\s*"
_DECIMAL = {"": 1, "k": 10**3, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15}
_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
_SIZE_UNITS = {p + "B": v for p, v in (_DECIMAL | _BINARY).items()} | {"": 1}
_BIT_RATES = {p + "bit": v for p, v in _DECIMAL.items()} | {p + "b": v for p, v in _DECIMAL.items()}
_BIT_RATES |= {p + "bps": v for p, v in _DECIMAL.items()}
_BYTE_RATES = {p + "B": v for p, v in (_DECIMAL | _BINARY).items()}
_BYTE_RATES |= {p + "Bps": v for p, v in _DECIMAL.items()} | {"": 1}  # a plain number: bytes/s
_SECONDS = {"": 1.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
_FLOP_PREFIXES = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "p": 1e15, "e": 1e18}

SIZE_SPELLINGS = "512MiB, 2GB, 24GiB, 1073741824 (B = byte; k, M, G, T = 1000^n; Ki, Mi, Gi, Ti = 1024^n)"
RATE_SPELLINGS = "100Gbit/s, 100Gb/s, 100Gbps (bits); 12.5GB/s, 800MiB/s (bytes); 1e9 (bytes/s)"


def _split(text: str) -> tuple[float, str] | None:
    match = re.fullmatch(_NUMBER + r"(\S*?)\s*", text)
    if match is None:
        return None
    return float(match.group(1)), match.group(2)


def finite(value: float, field: str) -> float:
    """value, or an error naming `field` when it is NaN or infinite."""
    if not math.isfinite(value):
        raise ShunterError(f"{field}: must be a finite number, got {value!r}")
    return value


def positive(value: float, field: str) -> float:
    """A finite value above zero, else an error naming `field`."""
    if not (math.isfinite(value) and value > 0):
        raise ShunterError(f"{field}: must be a positive number, got {value!r}")
    return value


def parse_bytes(text: str | int | float, field: str = "size") -> int:
    """Bytes from "512MiB", "2GB", "1e9" or a plain number; raises ShunterError naming `field`."""
    if isinstance(text, bool):
        raise ShunterError(f"{field}: expected a size, got {text!r}")
    if isinstance(text, int | float):
        value = float(text)
    else:
        parsed = _split(str(text))
        if parsed is None or parsed[1] not in _SIZE_UNITS:
            raise ShunterError(f"{field}: cannot read {text!r} as a size (examples: {SIZE_SPELLINGS})")
        value = parsed[0] * _SIZE_UNITS[parsed[1]]
    if not math.isfinite(value) or value >= 2**63:
        raise ShunterError(f"{field}: {text!r} is not a size this machine can hold")
    if value < 0:
        raise ShunterError(f"{field}: size must not be negative, got {text!r}")
    return int(value)


def parse_bandwidth(text: str | int | float, field: str = "bandwidth") -> float:
    """Bytes per second from "100Gbit/s", "100Gbps", "12.5GB/s", "800MiB/s" or a plain number of
    bytes/s; must be positive and finite."""
    if isinstance(text, bool):
        raise ShunterError(f"{field}: expected a bandwidth, got {text!r}")
    if isinstance(text, int | float):
        value = float(text)
    else:
        parsed = _split(str(text))
        unit = parsed[1].removesuffix("/s") if parsed else None
        if unit is not None and unit.lower().endswith("bit"):  # spelled out, so any case: tc's "mbit"
            unit = {k.lower(): k for k in _BIT_RATES}.get(unit.lower(), unit)
        if parsed is None or (unit not in _BIT_RATES and unit not in _BYTE_RATES):
            raise ShunterError(f"{field}: cannot read {text!r} as a bandwidth (examples: {RATE_SPELLINGS})")
        number = parsed[0]
        value = number * _BIT_RATES[unit] / 8 if unit in _BIT_RATES else number * _BYTE_RATES[unit]
    if not math.isfinite(value):
        raise ShunterError(f"{field}: bandwidth must be finite, got {text!r}")
    if not value > 0:
        raise ShunterError(f"{field}: bandwidth must be positive, got {text!r}")
    return value


def parse_seconds(text: str | int | float, field: str = "duration") -> float:
    """Seconds from '5us', '0.01ms', '2e-6', '0' (a plain number is seconds); finite, not negative."""
    if isinstance(text, bool):
        raise ShunterError(f"{field}: expected a duration, got {text!r}")
    if isinstance(text, int | float):
        value = float(text)
    else:
        parsed = _split(str(text))
        if parsed is None or parsed[1] not in _SECONDS:
            raise ShunterError(f"{field}: cannot read {text!r} as a duration (examples: 0ms, 5ms, 200us)")
        value = parsed[0] * _SECONDS[parsed[1]]
    if not math.isfinite(value) or value < 0:
        raise ShunterError(f"{field}: a duration must be finite and not negative, got {text!r}")
    return value


def parse_compute(text: str | int | float, field: str = "compute") -> float:
    """FLOP/s from "312TFLOP/s", "312 TFLOPS", "1.5e14" or a plain number; must be positive."""
    if isinstance(text, bool):
        raise ShunterError(f"{field}: expected a compute speed like '312TFLOP/s', got {text!r}")
    if isinstance(text, int | float):
        value = float(text)
    else:
        match = re.fullmatch(
            _NUMBER + r"([kKmMgGtTpPeE]?)(?:flop/s|flops)?\s*", str(text), flags=re.IGNORECASE
        )
        if match is None:
            raise ShunterError(
                f"{field}: cannot read {text!r} as a compute speed (examples: 312TFLOP/s, 1e14)"
            )
        value = float(match.group(1)) * _FLOP_PREFIXES[match.group(2).lower()]
    if not (math.isfinite(value) and value > 0):
        raise ShunterError(f"{field}: compute speed must be positive, got {text!r}")
    return value


def parse_rates(text: str, count: int, field: str, what: str = "devices") -> list[float]:
    """[count] bytes/s from '1Gbit/s' (every one) or 'a,b,...' (one each, the first first)."""
    parts = [part.strip() for part in text.split(",")]
    if len(parts) not in (1, count):
        raise ShunterError(
            f"{field}: {len(parts)} bandwidths for {count} {what} (give one for all, or one per {what[:-1]})"
        )
    values = []
    for index, part in enumerate(parts):
        where = field if len(parts) == 1 else f"{field} ({what[:-1]} {index})"
        if part.startswith("-"):
            raise ShunterError(f"{where}: bandwidth must be positive, got {part!r}")
        values.append(parse_bandwidth(part, where))
    return values * count if len(values) == 1 else values


def format_bytes(num_bytes: float) -> str:
    """1536 -> '1.5 KiB'."""
    value = float(num_bytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


SEED_LIMIT = 2**63  # torch.manual_seed and numpy take seeds in [0, 2^63)


def parse_number(
    value: str | int | float, field: str, *, minimum: float | None = None, above: float | None = None
) -> float:
    """A finite number from text or a number, at least `minimum` / above `above` when given."""
    if isinstance(value, bool):
        raise ShunterError(f"{field}: expected a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ShunterError(f"{field}: expected a number, got {value!r}") from None
    finite(number, field)
    if minimum is not None and number < minimum:
        raise ShunterError(f"{field}: must be at least {minimum:g}, got {value!r}")
    if above is not None and not number > above:
        raise ShunterError(f"{field}: must be greater than {above:g}, got {value!r}")
    return number


def parse_seed(value: str | int | float, field: str = "seed") -> int:
    """A random seed: a whole number in [0, 2^63), the range torch and numpy both accept."""
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ShunterError(f"{field}: a seed is a whole number, got {value!r}")
    try:
        seed = int(value)
    except (TypeError, ValueError, OverflowError):
        raise ShunterError(f"{field}: a seed is a whole number, got {value!r}") from None
    if not 0 <= seed < SEED_LIMIT:
        raise ShunterError(f"{field}: a seed must lie in [0, 2^63), got {value!r}")
    return seed


def flag_type(parse: Callable[..., Any], **limits: Any) -> Callable[[str], Any]:
    """An argparse `type=` from a parser above: its error becomes argparse's one line, which names
    the flag ("argument --seed: a seed must lie in [0, 2^63), got '-1'")."""

    def convert(text: str) -> Any:
        try:
            return parse(text, "value", **limits)
        except ShunterError as exc:
            raise argparse.ArgumentTypeError(str(exc).removeprefix("value: ")) from None

    convert.__name__ = parse.__name__.removeprefix("parse_")  # argparse names the type in errors
    return convert


def physical_memory_bytes() -> int:
    """This machine's RAM (Linux and macOS); 0 when it cannot be read."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (OSError, ValueError, AttributeError):
        return 0


def check_fits_in_memory(num_bytes: float, what: str, source: str) -> None:
    """An error naming `source` when `what` would need more than this machine's memory, with the
    size it would need: refused at once instead of swapping for minutes or failing half way."""
    available = physical_memory_bytes()
    if available and num_bytes > available:
        raise ShunterError(
            f"{source}: {what} would need {format_bytes(num_bytes)}, more than this machine's "
            f"{format_bytes(available)} of memory"
        )
