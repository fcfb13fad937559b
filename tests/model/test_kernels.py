"""The decode kernels against their torch references (dequantise, then torch's product)."""

from __future__ import annotations

import pytest
import torch

from shunter.model import kernels
from shunter.model.quant import (
    dequantize,
    quantize,
    quantized_linear,
    quantized_linear_reference,
    uses_kernels,
)

needs_kernels = pytest.mark.skipif(not kernels.available(), reason="no C compiler or no AVX2 here")


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
@pytest.mark.parametrize("tokens", [1, 2, 4, 7, 13])
@pytest.mark.parametrize(
    ("shape", "group"), [((9, 128), 64), ((64, 320), 32), ((5, 256), 128), ((6, 384), 192)]
)
def test_integer_products_equal_the_dequantised_reference(tokens, shape, group):
    """The kernels round each x to 8 bits per 32 inputs, an error of at most half a step (the
    block's largest |x| / 127) per input: the output is off by at most |W| times that."""
    torch.manual_seed(tokens)
    w, x = torch.randn(*shape), torch.randn(tokens, shape[1])
    for bits in (8, 4):
        q = quantize(w, bits, group)
        weight = dequantize(q)
        got = quantized_linear(x, q)
        assert uses_kernels(x, q)
        # the blocks the kernel rounds: 32 consecutive inputs
        half_step = x.reshape(tokens, -1, 32).abs().amax(-1, keepdim=True) / 127 / 2
        half_step = half_step.expand(-1, -1, 32).reshape(x.shape)
        bound = half_step.reshape(tokens, -1) @ weight.abs().T
        assert ((got - x @ weight.T).abs() <= 1.001 * bound + 1e-4).all()


@needs_kernels
def test_a_4_bit_group_the_kernel_cannot_unpack_goes_to_the_reference():
    """A 4-bit group's bytes unpack into whole blocks of 32 inputs only at 32 or a multiple of 64."""
    torch.manual_seed(1)
    w, x = torch.randn(5, 192), torch.randn(3, 192)
    q = quantize(w, 4, 96)
    assert not uses_kernels(x, q) and uses_kernels(x, quantize(w, 8, 96))
    torch.testing.assert_close(quantized_linear(x, q), quantized_linear_reference(x, q))


@needs_kernels
def test_integer_products_are_exact_when_x_needs_no_rounding():
    """x of integers whose block maxima are 127 is its own 8-bit code: only fp32 sums remain."""
    torch.manual_seed(0)
    w = torch.randn(33, 256)
    x = torch.randint(-127, 128, (3, 256)).float()
    x[:, ::32] = 127.0  # every block of 32 inputs holds a 127
    for bits in (8, 4):
        q = quantize(w, bits)
        expected = x @ dequantize(q).T  # sums of 256 products up to 1e3 each, in another order
        got = quantized_linear(x, q)
        torch.testing.assert_close(got, expected, rtol=0.0, atol=1e-5 * expected.abs().max().item())


@needs_kernels
def test_a_token_gets_the_same_numbers_alone_or_in_a_batch():
    """Engines that batch tokens differently (in memory, offloaded micro-batches) must agree."""
    torch.manual_seed(2)
    w, x = torch.randn(40, 128), torch.randn(11, 128).to(torch.bfloat16)
    for bits in (8, 4):
        q = quantize(w, bits)
        together = quantized_linear(x, q)
        for t in range(11):
            assert torch.equal(quantized_linear(x[t : t + 1], q), together[t : t + 1])


def test_without_kernels_the_reference_runs(monkeypatch):
    torch.manual_seed(1)
    q = quantize(torch.randn(16, 128), 4)
    x = torch.randn(2, 3, 128).to(torch.bfloat16)
    monkeypatch.setattr(kernels, "available", lambda: False)
    got = quantized_linear(x, q)
    assert got.shape == (2, 3, 16) and got.dtype == torch.bfloat16
    assert torch.equal(got, quantized_linear_reference(x, q))


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
