"""Quantised checkpoints in the offload engine: the same greedy tokens as the in-memory engine
(the oracle) for every family at 8 and 4 bits, and the packed bytes are what streams."""

from __future__ import annotations

import pytest
import torch

from shunter.errors import ShunterError
from shunter.model import generate, load_model
from shunter.model.checkpoint import Checkpoint
from shunter.model.quantize_checkpoint import quantize_checkpoint
from shunter.model.spec import load_spec
from shunter.offload import PipelineOptions, disk, load_offloaded, quantized_expert_bytes
from tests.tiny_models import FAMILIES

PROMPTS = [[3, 5, 7, 9, 11, 13, 15], [2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24], [1, 2]]
TIGHT = 1_900_000  # bytes: forces the tiny models' experts to stream
GROUP = 8  # divides every tiny model's dims (expert intermediate 32 or 48, latent ranks 16 and 24)
EVERYTHING = ("shared", "attention", "lm_head")


KLOTSKI = PipelineOptions(2, "hot", hot_first=True)


def _smallest_budget_model(path, options, sequences=3):
    """The offload engine under the smallest budget (in 50 kB steps) its placement accepts, so
    experts stream however small quantisation made them."""
    for budget in range(200_000, 4_000_000, 50_000):
        try:
            return load_offloaded(path, budget, options=options, sequences=sequences, max_slots=64)
        except ShunterError:
            continue
    raise AssertionError("no budget fits")


def _streamed_tokens_equal_in_memory(path, options=KLOTSKI):
    expected = generate(load_model(path).model, PROMPTS, 10).tokens
    model = _smallest_budget_model(path, options)
    try:
        assert generate(model, PROMPTS, 10).tokens == expected
        assert model.streamer.expert_loads > 0  # the budget really forced streaming
    finally:
        model.close()


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("family", FAMILIES)
def test_streamed_quantised_tokens_equal_the_in_memory_engine(
    tiny_checkpoint, tmp_path, family, bits, monkeypatch
):
    monkeypatch.setattr(disk, "POOLED_MIN_BYTES", 0)  # every streamed tensor in a reused buffer
    out = quantize_checkpoint(tiny_checkpoint(family), tmp_path / "q", bits, GROUP, EVERYTHING)
    _streamed_tokens_equal_in_memory(out.out_dir)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_fused_expert_layouts_quantise_and_stream_by_row(tiny_checkpoint, tmp_path, family):
    out = quantize_checkpoint(tiny_checkpoint(family, fused=True), tmp_path / "q", 4, GROUP)
    _streamed_tokens_equal_in_memory(out.out_dir, PipelineOptions(1, "layer", hot_first=False))


def test_at_4_bits_the_engine_streams_under_a_third_of_the_bf16_bytes(tiny_checkpoint, tmp_path):
    """Bytes read per streamed expert: packed 4-bit at group 32 is (0.5 + 4/32) / 2 = 0.3125 of
    bf16 per weight. (The placement pins more 4-bit experts, so totals would not compare.)"""
    source = tiny_checkpoint("mixtral", dtype=torch.bfloat16)
    quantized = quantize_checkpoint(source, tmp_path / "q4", 4, 32, EVERYTHING).out_dir
    read = {}
    for name, path in (("bf16", source), ("q4", quantized)):
        # 620 kB: just above the bf16 model's minimum, so every expert streams
        options = PipelineOptions(1, "layer", hot_first=False)
        model = load_offloaded(path, 620_000, options=options, max_slots=64)
        try:
            before, loads = model.reader.stats.bytes_read, model.streamer.expert_loads
            generate(model, PROMPTS[:1], 4)
            assert model.streamer.expert_loads > loads
            read[name] = (model.reader.stats.bytes_read - before) / (model.streamer.expert_loads - loads)
        finally:
            model.close()
    expert_bf16 = load_spec(source).expert_parameters() * 2
    assert read["bf16"] >= expert_bf16  # the whole expert, and any block streamed beside it
    assert read["q4"] <= expert_bf16 * 0.3125


@pytest.mark.parametrize("fused", [False, True])
def test_the_placement_sizes_quantised_experts_by_their_packed_bytes(tiny_checkpoint, tmp_path, fused):
    """A 4-bit expert at group 16 holds (0.5 + 4/16) bytes a weight, so the same budget pins more."""
    source = tiny_checkpoint("qwen3_moe", fused=fused)
    quantized = quantize_checkpoint(source, tmp_path / "q4", 4, 16).out_dir
    spec = load_spec(quantized)
    assert quantized_expert_bytes(spec, Checkpoint(source)) is None
    assert quantized_expert_bytes(spec, Checkpoint(quantized)) == spec.expert_parameters() * 3 // 4
    pinned = {}
    for name, path in (("fp32", source), ("q4", quantized)):
        model = load_offloaded(path, TIGHT, max_slots=64)
        pinned[name] = len(model.placement.resident_experts)
        model.close()
    assert pinned["q4"] > pinned["fp32"]
