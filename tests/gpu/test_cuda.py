"""The GPU path on a real GPU: skipped where torch sees none (CI has none; run these on a lent one).

Oracles: the CPU in-memory executor's greedy tokens (fp32 tiny models, every family), and for
quantised checkpoints the CPU reference path (dequantise, then fp32 product) that the GPU runs
too; for the quantiser, its CPU fit.
"""

from __future__ import annotations

import pytest
import torch

from shunter.model import generate, load_model, quant
from shunter.model.quant import dequantize, quantize
from shunter.model.quantize_checkpoint import quantize_checkpoint
from shunter.model.spec import load_spec
from shunter.offload import PipelineOptions, load_offloaded
from tests.tiny_models import FAMILIES

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

PROMPTS = [[3, 5, 7, 9, 11, 13, 15], [2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24], [1, 2]]
TIGHT = 1_900_000  # bytes of GPU memory: above the tiny models' working set, far below their size
GROUP = 8  # divides every tiny model's dims
EVERYTHING = ("shared", "attention", "lm_head")


def _streamed_on_the_gpu(path, host_experts: int = 6):
    spec = load_spec(path)
    host = host_experts * spec.expert_parameters() * 4
    return load_offloaded(
        path, TIGHT, options=PipelineOptions(2, "hot"), sequences=3, max_slots=64, device="cuda",
        host_memory_bytes=host,
    )  # fmt: skip


@pytest.mark.parametrize("family", FAMILIES)
def test_in_memory_and_streamed_on_the_gpu_give_the_cpu_tokens(tiny_checkpoint, family):
    path = tiny_checkpoint(family)
    expected = generate(load_model(path).model, PROMPTS, 10).tokens
    on_gpu = load_model(path, device="cuda").model
    assert on_gpu.weights.embed.device.type == "cuda"
    assert generate(on_gpu, PROMPTS, 10).tokens == expected
    model = _streamed_on_the_gpu(path)
    try:
        assert generate(model, PROMPTS, 10).tokens == expected
        assert model.streamer.expert_loads > 0  # experts really crossed the bus
        assert len(model.placement.host_experts) > 0  # out of pinned host memory
    finally:
        model.close()


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("family", FAMILIES)
def test_quantised_models_on_the_gpu_give_the_cpu_reference_tokens(
    tiny_checkpoint, tmp_path, family, bits, monkeypatch
):
    out = quantize_checkpoint(tiny_checkpoint(family), tmp_path / "q", bits, GROUP, EVERYTHING).out_dir
    on_gpu = generate(load_model(out, device="cuda").model, PROMPTS, 10).tokens
    model = _streamed_on_the_gpu(out)
    try:
        assert generate(model, PROMPTS, 10).tokens == on_gpu
    finally:
        model.close()
    # the CPU's integer kernels round activations; its reference path is what the GPU computes
    monkeypatch.setattr(quant, "uses_kernels", lambda x, w: False)
    assert generate(load_model(out).model, PROMPTS, 10).tokens == on_gpu


@pytest.mark.parametrize("bits", [8, 4])
def test_the_gpu_fits_the_groups_the_cpu_fits(bits):
    weight = torch.randn(256, 512, generator=torch.Generator().manual_seed(bits)) * 0.02
    on_cpu, on_gpu = quantize(weight, bits, 64), quantize(weight.cuda(), bits, 64)
    same_codes = (on_cpu.packed == on_gpu.packed.cpu()).float().mean().item()
    assert same_codes > 0.999  # a least-squares sum in another order may flip a rare tie
    error_cpu = (dequantize(on_cpu) - weight).square().sum()
    error_gpu = (dequantize(on_gpu).cpu() - weight).square().sum()
    assert abs(error_gpu - error_cpu) <= 1e-3 * error_cpu


def test_the_whole_model_checkpoint_quantised_on_the_gpu_loads_and_decodes(tiny_checkpoint, tmp_path):
    path = tiny_checkpoint("mixtral")
    on_gpu = quantize_checkpoint(path, tmp_path / "gpu", 4, GROUP, device="cuda").out_dir
    on_cpu = quantize_checkpoint(path, tmp_path / "cpu", 4, GROUP).out_dir
    a = generate(load_model(on_gpu, device="cuda").model, PROMPTS, 6).tokens
    b = generate(load_model(on_cpu, device="cuda").model, PROMPTS, 6).tokens
    assert a == b
