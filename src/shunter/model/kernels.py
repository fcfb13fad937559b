"""Decode-time products of a few tokens with bf16, 8-bit and 4-bit weights (kernels.c), built at
first use with the system's C compiler, with the torch reference each is tested against.

Weights `[N, K]` (N outputs, K inputs); x `[T, K]` with T small (one decode step's tokens for one
expert). 8-bit: `q` int8 [N, K], `scale` fp32 [N, K/G], W = q * scale. 4-bit: `q` uint8 [N, K/2]
(input 2j in the low nibble of byte j, 2j+1 in the high), `scale` and `offset` fp32 [N, K/G],
W = q * scale + offset. Where the kernels cannot be built (no compiler, no AVX2) every product
runs the reference, and `available()` says so.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("kernels.c")
CFLAGS = ("-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC")
MAX_KERNEL_TOKENS = 8  # above this a product is compute-bound: dequantise once and use torch's GEMM
BF16_MIN_TOKENS = 2  # one token: torch's bf16 product is as fast (measured)
GROUP_MULTIPLE = 32  # the kernels walk inputs in blocks of 32 (4-bit: 16 bytes)


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "shunter" / "kernels"


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The compiled kernels, built once per source and flags into the user's cache; None where
    they cannot run here. torch is imported first, so the kernels share its OpenMP runtime (one
    thread pool, not two fighting for the cores)."""
    if sys.platform != "linux" or torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return None
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(CFLAGS).encode()).hexdigest()[:16]
    target = cache_dir() / f"shunter-kernels-{digest}.so"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        # build beside the target and rename: a concurrent build or a killed one leaves no half file
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            built = Path(tmp) / target.name
            compiler = os.environ.get("CC", "cc")
            try:
                subprocess.run(
                    [compiler, *CFLAGS, str(SOURCE), "-o", str(built)],
                    check=True,
                    capture_output=True,
                    timeout=300,
                )
            except (OSError, subprocess.SubprocessError):
                return None
            os.replace(built, target)
    library = ctypes.CDLL(str(target))
    long, ptr = ctypes.c_long, ctypes.c_void_p
    library.linear_bf16.argtypes = [ptr, ptr, ptr, long, long, long]
    library.quantize_rows.argtypes = [ptr, ptr, ptr, long, long]
    library.linear_q8.argtypes = [ptr, ptr, ptr, ptr, ptr, long, long, long, long]
    library.linear_q4.argtypes = [ptr, ptr, ptr, ptr, ptr, ptr, ptr, long, long, long, long]
    for fn in (library.linear_bf16, library.quantize_rows, library.linear_q8, library.linear_q4):
        fn.restype = None
    return library


def available() -> bool:
    return _library() is not None


_omp_threads = {"set": 0}


def _threads(library: ctypes.CDLL) -> None:
    """OpenMP's team size follows torch's thread setting (set_num_threads changes it)."""
    wanted = torch.get_num_threads()
    if _omp_threads["set"] != wanted:
        ctypes.CDLL("libgomp.so.1").omp_set_num_threads(wanted)
        _omp_threads["set"] = wanted


def _as_fp32_rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).to(torch.float32).contiguous()


# -- references: dequantise, then torch's product ----------------------------------------------------
def dequantize_q8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """int8 [N, K] and fp32 [N, K/G] -> fp32 [N, K]."""
    N, K = q.shape
    return (q.reshape(N, scale.shape[1], -1).float() * scale[..., None]).reshape(N, K)


def unpack_q4(q: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K/2] -> the 4-bit values as uint8 [N, K] (input 2j low nibble, 2j+1 high)."""
    return torch.stack([q & 0x0F, q >> 4], dim=-1).reshape(q.shape[0], -1)


def dequantize_q4(q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K/2], fp32 [N, K/G] twice -> fp32 [N, K]."""
    values = unpack_q4(q)
    N, K = values.shape
    grouped = values.reshape(N, scale.shape[1], -1).float() * scale[..., None] + offset[..., None]
    return grouped.reshape(N, K)


# -- the products ------------------------------------------------------------------------------------
def linear_bf16(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [..., K] times bf16 w [N, K]^T -> [..., N] in x's dtype."""
    library = _library()
    tokens = x.numel() // x.shape[-1]
    if library is None or tokens > MAX_KERNEL_TOKENS or w.shape[1] % 8:
        return torch.nn.functional.linear(x, w.to(x.dtype))
    xs = _as_fp32_rows(x)
    y = torch.empty(tokens, w.shape[0], dtype=torch.float32)
    _threads(library)
    library.linear_bf16(xs.data_ptr(), w.contiguous().data_ptr(), y.data_ptr(), tokens, *w.shape)
    return y.to(x.dtype).reshape(*x.shape[:-1], w.shape[0])


def _quantized_rows(library: ctypes.CDLL, xs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 [T, K] -> (int8 [T, K], fp32 [T, K/32] block scales), as the integer products read x."""
    tokens, K = xs.shape
    xq, x_scale = torch.empty(tokens, K, dtype=torch.int8), torch.empty(tokens, K // 32)
    library.quantize_rows(xs.data_ptr(), xq.data_ptr(), x_scale.data_ptr(), tokens, K)
    return xq, x_scale


def linear_q8(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [..., K] times the 8-bit weight (q [N, K], scale [N, K/G]) -> [..., N] in x's dtype.
    The kernel rounds x to 8 bits per 32 inputs (relative error about 0.4% of the block's largest)."""
    library = _library()
    N, K = q.shape
    group = K // scale.shape[1]
    tokens = x.numel() // K
    if library is None or tokens > MAX_KERNEL_TOKENS or group % GROUP_MULTIPLE:
        return torch.nn.functional.linear(x, dequantize_q8(q, scale.float()).to(x.dtype))
    xq, x_scale = _quantized_rows(library, _as_fp32_rows(x))
    y = torch.empty(tokens, N, dtype=torch.float32)
    sc = scale.float().contiguous()
    _threads(library)
    library.linear_q8(
        xq.data_ptr(), x_scale.data_ptr(), q.data_ptr(), sc.data_ptr(), y.data_ptr(), tokens, N, K, group
    )
    return y.to(x.dtype).reshape(*x.shape[:-1], N)


def linear_q4(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """x [..., K] times the 4-bit weight (q [N, K/2], scale and offset [N, K/G]) -> [..., N].
    The kernel rounds x to 8 bits per 32 inputs, as linear_q8 does."""
    library = _library()
    N, K = q.shape[0], 2 * q.shape[1]
    groups = scale.shape[1]
    group = K // groups
    tokens = x.numel() // K
    if library is None or tokens > MAX_KERNEL_TOKENS or group % GROUP_MULTIPLE:
        weight = dequantize_q4(q, scale.float(), offset.float())
        return torch.nn.functional.linear(x, weight.to(x.dtype))
    xs = _as_fp32_rows(x)
    # within each 32 inputs: the 16 even ones, then the 16 odd ones (the order nibbles unpack in)
    x_split = xs.reshape(tokens, K // 32, 16, 2).transpose(-1, -2).reshape(tokens, K).contiguous()
    xq, x_scale = _quantized_rows(library, x_split)
    x_group_sum = xs.reshape(tokens, groups, group).sum(-1).contiguous()
    y = torch.empty(tokens, N, dtype=torch.float32)
    sc, off = scale.float().contiguous(), offset.float().contiguous()
    _threads(library)
    library.linear_q4(
        xq.data_ptr(), x_scale.data_ptr(), x_group_sum.data_ptr(), q.data_ptr(), sc.data_ptr(),
        off.data_ptr(), y.data_ptr(), tokens, N, K, group,
    )  # fmt: skip
    return y.to(x.dtype).reshape(*x.shape[:-1], N)
