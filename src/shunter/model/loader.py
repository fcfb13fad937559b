"""Resolve a MODEL argument (a directory or a built-in name) and load it into memory."""

from __future__ import annotations

import contextlib
import ctypes
import functools
from dataclasses import dataclass
from pathlib import Path

import torch

from shunter.errors import FieldError, ShunterError
from shunter.model.checkpoint import Checkpoint
from shunter.model.executor import InMemoryModel
from shunter.model.layers import pack_linear_weight
from shunter.model.spec import ModelSpec, load_spec
from shunter.model.tokenizer import Tokenizer
from shunter.model.weights import load_weights, map_tensors
from shunter.trace.routing_trace import RoutingTrace, load_trace

DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    path: Path
    spec: ModelSpec
    model: InMemoryModel
    tokenizer: Tokenizer | None


DEFAULT_MODEL = "shunter-tiny"
BUILTIN_ROOT = Path(__file__).resolve().parent.parent / "builtin"
TRACE_FILE = "routing-trace.npz"  # a built-in model's held-out routing trace, beside its weights


def model_trace(model_dir: Path) -> RoutingTrace | None:
    """The routing trace a model directory carries beside its weights (the built-in one does)."""
    path = Path(model_dir) / TRACE_FILE
    return load_trace(path) if path.is_file() else None


def default_trace_path() -> Path:
    """The default trace of every command that takes one: the built-in model's held-out routing."""
    path = BUILTIN_ROOT / DEFAULT_MODEL / TRACE_FILE
    if not path.is_file():
        raise ShunterError(f"{path}: the built-in routing trace is missing; pass a trace file explicitly")
    return path


def builtin_models() -> dict[str, Path]:
    """Built-in model names and where they live inside the package."""
    root = BUILTIN_ROOT
    if not root.is_dir():
        return {}
    return {p.name: p for p in sorted(root.iterdir()) if (p / "config.json").is_file()}


def resolve_model_dir(model: str | Path) -> Path:
    path = Path(model)
    if path.exists():
        return path
    builtins = builtin_models()
    if str(model) in builtins:
        return builtins[str(model)]
    known = ", ".join(builtins) or "none yet"
    raise ShunterError(f"{model}: no such model directory or built-in model (built-in: {known})")


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MMAP_THRESHOLD_BYTES = 1 << 20


@functools.cache
def fix_mmap_threshold() -> None:
    """Keep glibc from moving large blocks into the heap. After each free of a mapped block glibc
    raises its mmap threshold to that block's size (up to 32 MiB), so the transient copies of
    loading (an expert read, joined, packed) land in the heap and stay resident after they are
    freed: 2.16 GB of RSS for a 1.47 GB model, against 1.73 GB with the threshold fixed at 1 MiB
    (measured). No effect where the C library is not glibc."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)


def load_model(
    model: str | Path, dtype: str | None = None, pack: bool = True, device: torch.device | str = "cpu"
) -> LoadedModel:
    """Load config, weights and tokenizer. dtype None keeps the checkpoint's dtype. `pack` prepacks
    bf16 projection weights for oneDNN (no effect on other dtypes); False keeps plain tensors.
    `device` a GPU: every weight goes there as it is read (host memory holds one expert at a time)."""
    device = torch.device(device)
    path = resolve_model_dir(model)
    spec = load_spec(path)
    fix_mmap_threshold()
    if dtype is not None and dtype not in DTYPE_NAMES:
        raise FieldError("dtype", f"{dtype!r} is not one of {', '.join(DTYPE_NAMES)}")
    torch_dtype = DTYPE_NAMES[dtype] if dtype else spec.torch_dtype
    if device.type == "cpu":
        weights = load_weights(spec, Checkpoint(path), torch_dtype, pack_linear_weight if pack else None)
    else:
        to_device = functools.partial(map_tensors, fn=lambda t: t.to(device))
        weights = to_device(load_weights(spec, Checkpoint(path), torch_dtype, to_device))
    executor = InMemoryModel(spec, weights, torch_dtype, device)
    return LoadedModel(path, spec, executor, Tokenizer.from_model_dir(path))
