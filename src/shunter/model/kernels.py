"""Decode-time products of a few tokens with bf16, 8-bit and 4-bit weights (kernels.c), built at
first use with the system's C compiler, with the torch reference each is tested against.

Weights `[N, K]` (N outputs, K inputs); x `[T, K]`. The bf16 product is for a few tokens (one
decode step's for one expert) and falls back to torch past MAX_KERNEL_TOKENS; the 8- and 4-bit
ones take shunter.model.quant's packed format and any number of tokens (every token computed
alike, so two engines that batch tokens differently get the same numbers). Where the kernels
cannot be built (no compiler, no AVX2) `available()` says so and quant.quantized_linear
dequantises instead.
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
MAX_KERNEL_TOKENS = 8  # bf16 above this: compute-bound, torch's GEMM is faster
BF16_MIN_TOKENS = 1  # from one token: the tiled kernel reads at 38-42 GB/s there, torch 28-32 (measured)
GROUP_MULTIPLE = 32  # the integer kernels walk inputs in blocks of 32


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
    library.linear_q8.argtypes = [ptr, ptr, ptr, ptr, long, long, long, long]
    library.linear_q4.argtypes = [ptr, ptr, ptr, ptr, ptr, long, long, long, long]
    library.linear_bf16.restype = None
    library.linear_q8.restype = library.linear_q4.restype = ctypes.c_int
    return library


def available() -> bool:
    return _library() is not None


def supports_group(bits: int, group: int) -> bool:
    """Whether the integer kernels take this group size: a multiple of 32 (8-bit); 32 or a multiple
    of 64 (4-bit: a group's bytes unpack into whole blocks of 32 inputs only then)."""
    if bits == 4:
        return group == 32 or group % 64 == 0
    return group % GROUP_MULTIPLE == 0


_omp_threads = {"set": 0}


def _threads(library: ctypes.CDLL) -> None:
    """OpenMP's team size follows torch's thread setting (set_num_threads changes it)."""
    wanted = torch.get_num_threads()
    if _omp_threads["set"] != wanted:
        ctypes.CDLL("libgomp.so.1").omp_set_num_threads(wanted)
        _omp_threads["set"] = wanted


def _as_fp32_rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).to(torch.float32).contiguous()


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


def _fp16(t: torch.Tensor) -> torch.Tensor:
    """t as contiguous fp16, without a tensor op where it already is (as stored weights are)."""
    return t if t.dtype == torch.float16 and t.is_contiguous() else t.to(torch.float16).contiguous()


def _checked(status: int) -> None:
    if status != 0:
        raise MemoryError("the decode kernel could not allocate its scratch for x")


def linear_q8(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [..., K] times an 8-bit weight of shunter.model.quant (packed int8 [N, K], fp16 scales
    [N, K/G], G a multiple of 32) -> [..., N] in x's dtype. x is rounded to 8 bits per 32 inputs
    (an error of at most half a step, the block's largest |x| / 127, per input), in the kernel.
    Needs available()."""
    library = _library()
    assert library is not None, "the kernels are not available here"
    N, K = packed.shape
    group = K // scales.shape[1]
    xs = _as_fp32_rows(x)
    tokens = xs.shape[0]
    y = torch.empty(tokens, N, dtype=torch.float32)
    packed, sc = packed if packed.is_contiguous() else packed.contiguous(), _fp16(scales)
    _threads(library)
    _checked(
        library.linear_q8(xs.data_ptr(), packed.data_ptr(), sc.data_ptr(), y.data_ptr(), tokens, N, K, group)
    )
    return y.to(x.dtype).reshape(*x.shape[:-1], N)


def linear_q4(
    x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor
) -> torch.Tensor:
    """x [..., K] times a 4-bit weight of shunter.model.quant (packed uint8 [N, K/2], byte j of a
    group holding inputs j and j + G/2; fp16 scales and mins [N, K/G], G a multiple of 32) ->
    [..., N] in x's dtype, G 32 or a multiple of 64 (`supports_group`). x is rounded to 8 bits per
    32 inputs as linear_q8 does."""
    library = _library()
    assert library is not None, "the kernels are not available here"
    N, K = packed.shape[0], 2 * packed.shape[1]
    group = K // scales.shape[1]
    xs = _as_fp32_rows(x)
    tokens = xs.shape[0]
    y = torch.empty(tokens, N, dtype=torch.float32)
    packed = packed if packed.is_contiguous() else packed.contiguous()
    sc, low = _fp16(scales), _fp16(mins)
    _threads(library)
    _checked(
        library.linear_q4(
            xs.data_ptr(), packed.data_ptr(), sc.data_ptr(), low.data_ptr(), y.data_ptr(), tokens, N, K, group
        )
    )
    return y.to(x.dtype).reshape(*x.shape[:-1], N)
