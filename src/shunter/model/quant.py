"""Weight-only group-wise quantisation of projection weights: the format, the math, the reference.

A [out, in] weight is cut into groups of `group_size` consecutive input columns per output row.
- 8 bits, symmetric (llama.cpp's Q8_0): w = q * scale, q int8 in [-127, 127], one fp16 scale per
  group; 8.25 bits a weight at group 64 (Q8_0: 8.5 at group 32).
- 4 bits, asymmetric (llama.cpp's Q4_1, HQQ's form): w = q * scale + min, q in [0, 15], an fp16
  scale and an fp16 min per group, fitted by a search over clipped ranges with a least-squares
  refit (`fit_scale_and_min`); 4.5 bits a weight at group 64, the same as Q4_0's 4.5 at group
  32. The min lets a skewed group use all 16 levels (symmetric 4-bit spends half its levels on a
  sign the group may not need), and scale + min is the form torch's
  own int4 CPU kernel takes, should a faster kernel use it later.
Two 4-bit values share a byte: byte j of a group holds q[j] in its low nibble and q[j + g/2] in
its high nibble, so unpacking is two vector ops (mask, shift) and one concatenation per group.

The layout on disk is in docs/quantization.md. `dequantize` is the fast vectorised path;
`dequantize_reference` computes the same numbers element by element and is its test oracle.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from shunter.errors import ShunterError
from shunter.model import kernels

SUPPORTED_BITS = (4, 8)
DEFAULT_GROUP_SIZE = 64
SCALE_DTYPE = torch.float16  # as llama.cpp's Q8_0/Q4_1 blocks store their scale and min
QUANT_METHOD = "shunter-groupwise"
# the tensors one quantised weight `X.weight` (or a fused `X`) becomes in a checkpoint
QUANTIZED_SUFFIXES = ("qweight", "scales", "mins")


@dataclass
class QuantizedWeight:
    """A projection weight of logical shape [..., out, in] (nn.Linear's orientation; leading dims
    stack experts), quantised along `in` in groups of `group_size`.

    packed: 8 bits: int8 [..., out, in]; 4 bits: uint8 [..., out, in/2] (two values a byte).
    scales, mins: fp16 [..., out, in/group_size]; mins is None at 8 bits (symmetric)."""

    packed: torch.Tensor
    scales: torch.Tensor
    mins: torch.Tensor | None
    bits: int
    group_size: int

    @property
    def shape(self) -> tuple[int, ...]:
        """The logical shape [..., out, in] of the weight this stands for."""
        *lead, out, groups = self.scales.shape
        return (*lead, out, groups * self.group_size)

    @property
    def nbytes(self) -> int:
        """Bytes held: packed values, scales and mins."""
        return sum(
            t.numel() * t.element_size() for t in (self.packed, self.scales, self.mins) if t is not None
        )

    def map_rows(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> QuantizedWeight:
        """fn applied to packed, scales and mins alike; fn may index leading dims or select, reorder
        or concatenate rows (dim -2), never touch the last dim (groups differ in width there)."""
        return QuantizedWeight(
            fn(self.packed),
            fn(self.scales),
            None if self.mins is None else fn(self.mins),
            self.bits,
            self.group_size,
        )

    def __getitem__(self, index) -> QuantizedWeight:
        """Expert `index` of a stacked [E, out, in] weight."""
        return self.map_rows(lambda t: t[index])


def quantized_tensor_names(name: str) -> tuple[str, str, str]:
    """The checkpoint names (qweight, scales, mins) standing for `name`: `X.weight` -> `X.qweight`,
    `X.scales`, `X.mins`; a fused expert tensor `X` (no `.weight`) -> `X.qweight`, ..."""
    base = name.removesuffix(".weight")
    return tuple(f"{base}.{suffix}" for suffix in QUANTIZED_SUFFIXES)  # type: ignore[return-value]


def check_quantization(bits: int, group_size: int, in_features: int, what: str) -> None:
    """ShunterError naming `what` unless `bits` and `group_size` can quantise a weight with
    `in_features` input columns."""
    if bits not in SUPPORTED_BITS:
        raise ShunterError(f"{what}: bits must be 4 or 8, got {bits}")
    if group_size <= 0 or group_size % 2:
        raise ShunterError(f"{what}: group size must be a positive even number, got {group_size}")
    if in_features % group_size:
        raise ShunterError(
            f"{what}: group size {group_size} does not divide the input dimension {in_features}"
        )


def quantize(
    weight: torch.Tensor, bits: int, group_size: int = DEFAULT_GROUP_SIZE, what: str = "weight"
) -> QuantizedWeight:
    """Quantise a [..., out, in] weight group-wise along `in` (round to nearest). `what` names the
    tensor in errors (a non-finite weight, a group size that does not divide `in`)."""
    check_quantization(bits, group_size, weight.shape[-1], what)
    w = weight.float()
    if not bool(torch.isfinite(w).all()):
        raise ShunterError(f"{what}: holds non-finite values (inf or NaN); cannot quantise it")
    *lead, out, in_features = w.shape
    groups = w.reshape(*lead, out, in_features // group_size, group_size)
    if bits == 8:
        scales = (groups.abs().amax(-1) / 127).to(SCALE_DTYPE)
        _check_finite_scales(scales, what)
        divisor = torch.where(scales == 0, 1.0, scales.float())[..., None]
        q = (groups / divisor).round().clamp(-127, 127).to(torch.int8)
        return QuantizedWeight(q.reshape(w.shape), scales, None, 8, group_size)
    scales, mins = fit_scale_and_min(groups)
    _check_finite_scales(scales, what)
    _check_finite_scales(mins, what)
    q = _codes_4bit(groups, scales, mins).to(torch.uint8)
    half = group_size // 2
    packed = q[..., :half] | (q[..., half:] << 4)
    return QuantizedWeight(packed.reshape(*lead, out, in_features // 2), scales, mins, 4, group_size)


# Ranges tried per 4-bit group, as shares of its [min, max] cut off (below, above): the full range
# first, so no group is fitted worse than min/max rounding, then narrower ones that give up a few
# outliers for a finer step (llama.cpp's Q4_K and HQQ search their ranges the same way).
RANGE_CUTS = ((0.0, 0.0), (0.03, 0.03), (0.06, 0.06), (0.1, 0.1), (0.15, 0.15),
              (0.06, 0.0), (0.0, 0.06), (0.12, 0.0), (0.0, 0.12))  # fmt: skip


def _codes_4bit(groups: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor) -> torch.Tensor:
    """Round to nearest against the stored fp16 scale and min (so the codes are the best for them)."""
    divisor = torch.where(scales == 0, 1.0, scales.float())[..., None]
    return ((groups - mins.float()[..., None]) / divisor).round().clamp(0, 15)


def _squared_error(groups: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor) -> torch.Tensor:
    codes = _codes_4bit(groups, scales, mins)
    return (codes * scales.float()[..., None] + mins.float()[..., None] - groups).square().sum(-1)


def fit_scale_and_min(groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16 (scale, min) per 4-bit group of groups [..., G, g] (fp32): of the ranges RANGE_CUTS
    cuts from each group's [min, max], each taken as it is and refitted by least squares on the
    codes it gives (the scale and min minimising the squared error for those codes), the one whose
    stored (fp16) scale and min reconstruct the group with the least squared error. The full
    range is a candidate, so a group is never fitted worse than by plain min/max rounding."""
    low, high = groups.amin(-1), groups.amax(-1)
    width = high - low
    full = (width / 15).to(SCALE_DTYPE), low.to(SCALE_DTYPE)
    if not (bool(torch.isfinite(full[0]).all()) and bool(torch.isfinite(full[1]).all())):
        return full  # a range past fp16: the caller says so rather than clip it away silently
    best: tuple[torch.Tensor, torch.Tensor] | None = None
    best_error = torch.full_like(low, float("inf"))
    g = groups.shape[-1]
    for below, above in RANGE_CUTS:
        lo, hi = low + below * width, high - above * width
        scale, mn = ((hi - lo) / 15).to(SCALE_DTYPE), lo.to(SCALE_DTYPE)
        codes = _codes_4bit(groups, scale, mn)
        # least squares of groups on codes: scale = cov(q, w) / var(q), min = mean(w) - scale mean(q)
        q_sum, w_sum = codes.sum(-1), groups.sum(-1)
        det = g * codes.square().sum(-1) - q_sum.square()
        fitted = (g * (codes * groups).sum(-1) - q_sum * w_sum) / torch.where(det > 0, det, 1.0)
        refit_scale = torch.where(det > 0, fitted, scale.float())
        refit_min = torch.where(det > 0, (w_sum - refit_scale * q_sum) / g, mn.float())
        for candidate in ((scale, mn), (refit_scale.to(SCALE_DTYPE), refit_min.to(SCALE_DTYPE))):
            if not (bool(torch.isfinite(candidate[0]).all()) and bool(torch.isfinite(candidate[1]).all())):
                continue  # a refit past fp16's range: the full range (always first) still stands
            error = _squared_error(groups, *candidate)
            better = error < best_error
            if best is None:
                best = candidate
            else:
                best = tuple(torch.where(better, new, old) for new, old in zip(candidate, best, strict=True))
            best_error = torch.where(better, error, best_error)
    assert best is not None  # the full range, finite, is the first candidate
    return best


def _check_finite_scales(scales: torch.Tensor, what: str) -> None:
    if not bool(torch.isfinite(scales).all()):
        raise ShunterError(f"{what}: a group's range exceeds fp16 (|w| > 65504); cannot quantise it")


def dequantize(w: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The [..., out, in] weight `w` stands for, in `dtype` (vectorised). The codes are converted
    as they are copied into the output's halves and scaled in place: concatenating the nibbles,
    converting and then multiplying took 4x as long (29 against 7.2 ms for [7168, 1024], one
    token's worth of gate and up, measured here)."""
    *lead, out, groups = w.scales.shape
    g = w.group_size
    weight = torch.empty(*lead, out, groups, g, dtype=dtype, device=w.packed.device)
    if w.bits == 8:
        weight.copy_(w.packed.view(*lead, out, groups, g))
        weight.mul_(w.scales.to(dtype)[..., None])
    else:
        assert w.mins is not None, "4-bit weights carry mins"
        packed = w.packed.view(*lead, out, groups, g // 2)
        weight[..., : g // 2].copy_(packed & 0x0F)
        weight[..., g // 2 :].copy_(packed >> 4)
        weight.mul_(w.scales.to(dtype)[..., None]).add_(w.mins.to(dtype)[..., None])
    return weight.view(*lead, out, groups * g)


def dequantize_reference(w: QuantizedWeight) -> torch.Tensor:
    """`dequantize` written out element by element in fp32: the oracle the fast path is tested
    against (slow; tiny weights only)."""
    assert w.packed.dim() == 2, "the reference takes one [out, in] weight"
    out, in_features = w.shape
    g = w.group_size
    result = torch.empty(out, in_features)
    for row in range(out):
        for col in range(in_features):
            group, j = divmod(col, g)
            scale = float(w.scales[row, group])
            if w.bits == 8:
                result[row, col] = int(w.packed[row, col]) * scale
                continue
            half = g // 2
            byte = int(w.packed[row, group * half + j % half])
            code = byte % 16 if j < half else byte // 16
            result[row, col] = code * scale + float(w.mins[row, group])  # type: ignore[index]
    return result


def quantized_linear(x: torch.Tensor, w: QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., in] @ dequantize(w).T (+ bias) -> [..., out] in x's dtype.

    On a CPU with the decode kernels (shunter.model.kernels: integer dot products of the packed
    bytes with x rounded to 8 bits per 32 inputs, as llama.cpp computes) for one [out, in] weight;
    otherwise `quantized_linear_reference`."""
    if uses_kernels(x, w):
        if w.bits == 8:
            out = kernels.linear_q8(x, w.packed, w.scales)
        else:
            assert w.mins is not None, "4-bit weights carry mins"
            out = kernels.linear_q4(x, w.packed, w.scales, w.mins)
        return out if bias is None else out + bias.to(out.dtype)
    return quantized_linear_reference(x, w, bias)


def uses_kernels(x: torch.Tensor, w: QuantizedWeight) -> bool:
    return (
        x.device.type == "cpu"
        and w.packed.dim() == 2
        and kernels.supports_group(w.bits, w.group_size)
        and kernels.available()
    )


def quantized_linear_reference(
    x: torch.Tensor, w: QuantizedWeight, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x [..., in] @ dequantize(w).T (+ bias): the weight unpacked, then multiplied. On a CPU in
    fp32: without AVX512-BF16 a bf16 product is slower than an fp32 one (8.1 against 1.6 ms for
    [7168, 1024] at one token, measured here). Elsewhere the weight is unpacked to x's dtype."""
    compute = torch.float32 if x.device.type == "cpu" else x.dtype
    weight = dequantize(w, compute)
    out = F.linear(x.to(compute), weight, None if bias is None else bias.to(compute))
    return out.to(x.dtype)
