"""The decode kernels against their torch references (dequantise, then torch's product)."""

from __future__ import annotations

import pytest
import torch

from shunter.model import kernels

needs_kernels = pytest.mark.skipif(not kernels.available(), reason="no C compiler or no AVX2 here")
GROUP = 64


def _q8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    N, K = w.shape
    scale = w.reshape(N, K // GROUP, GROUP).abs().amax(-1) / 127
    q = torch.round(w / scale.repeat_interleave(GROUP, 1)).to(torch.int8)
    return q, scale


def _q4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    N, K = w.shape
    grouped = w.reshape(N, K // GROUP, GROUP)
    offset = grouped.amin(-1)
    scale = (grouped.amax(-1) - offset) / 15
    values = torch.round((grouped - offset[..., None]) / scale[..., None]).clamp(0, 15).to(torch.uint8)
    values = values.reshape(N, K)
    return (values[:, 0::2] | (values[:, 1::2] << 4)).contiguous(), scale, offset


def test_nibbles_unpack_in_input_order():
    values = torch.randint(0, 16, (5, 64), dtype=torch.uint8)
    packed = values[:, 0::2] | (values[:, 1::2] << 4)
    assert torch.equal(kernels.unpack_q4(packed), values)


@needs_kernels
@pytest.mark.parametrize("tokens", [1, 3, 4, 5, 8])
@pytest.mark.parametrize("shape", [(7, 128), (64, 256), (130, 192)])
def test_bf16_product_equals_torch_in_fp32(tokens, shape):
    torch.manual_seed(tokens)
    w = torch.randn(*shape).to(torch.bfloat16)
    x = torch.randn(tokens, shape[1])
    expected = x @ w.float().T
    torch.testing.assert_close(kernels.linear_bf16(x, w), expected, rtol=1e-5, atol=1e-4)


@needs_kernels
@pytest.mark.parametrize("tokens", [1, 2, 4, 7])
@pytest.mark.parametrize("shape", [(9, 128), (64, 320)])
def test_integer_products_equal_the_dequantised_reference(tokens, shape):
    """The kernels round each x to 8 bits per 32 inputs, an error of at most half a step (the
    block's largest |x| / 127) per input: the output is off by at most |W| times that."""
    torch.manual_seed(tokens)
    w, x = torch.randn(*shape), torch.randn(tokens, shape[1])
    half_step = (x.reshape(tokens, -1, 32).abs().amax(-1, keepdim=True) / 127 / 2).expand(-1, -1, 32)
    for weight, got in (
        (kernels.dequantize_q8(*_q8(w)), kernels.linear_q8(x, *_q8(w))),
        (kernels.dequantize_q4(*_q4(w)), kernels.linear_q4(x, *_q4(w))),
    ):
        bound = half_step.reshape(tokens, -1) @ weight.abs().T
        assert ((got - x @ weight.T).abs() <= 1.001 * bound + 1e-4).all()


@needs_kernels
def test_integer_products_are_exact_when_x_needs_no_rounding():
    """x of integers whose block maxima are 127 is its own 8-bit code: only fp32 sums remain."""
    torch.manual_seed(0)
    w = torch.randn(33, 256)
    x = torch.randint(-127, 128, (3, 256)).float()
    x[:, ::32] = 127.0
    for weight, got in (
        (kernels.dequantize_q8(*_q8(w)), kernels.linear_q8(x, *_q8(w))),
        (kernels.dequantize_q4(*_q4(w)), kernels.linear_q4(x, *_q4(w))),
    ):
        expected = x @ weight.T  # sums of 256 products up to 1e3 each, in another order
        torch.testing.assert_close(got, expected, rtol=0.0, atol=1e-5 * expected.abs().max().item())


def test_many_tokens_use_the_reference_and_keep_the_shape_and_dtype():
    torch.manual_seed(1)
    w = torch.randn(16, 128)
    x = torch.randn(2, kernels.MAX_KERNEL_TOKENS, 128).to(torch.bfloat16)
    q4, s4, o4 = _q4(w)
    got = kernels.linear_q4(x, q4, s4, o4)
    assert got.shape == (2, kernels.MAX_KERNEL_TOKENS, 16) and got.dtype == torch.bfloat16
    expected = torch.nn.functional.linear(x, kernels.dequantize_q4(q4, s4, o4).to(torch.bfloat16))
    assert torch.equal(got, expected)


@needs_kernels
def test_the_build_is_cached_per_source(tmp_path, monkeypatch):
    """A second process finds the library in the cache; a changed source builds a new one."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    kernels._library.cache_clear()
    try:
        assert kernels.available()
        built = list(kernels.cache_dir().glob("shunter-kernels-*.so"))
        assert len(built) == 1 and kernels.cache_dir().is_relative_to(tmp_path)
    finally:
        kernels._library.cache_clear()
