"""Quantised checkpoints in the offload engine: the same greedy tokens as the in-memory engine
(the oracle) for every family at 8 and 4 bits, and the packed bytes are what streams."""

from __future__ import annotations

import pytest
import torch

from shunter.model import generate, load_model
from shunter.model.quantize_checkpoint import quantize_checkpoint
from shunter.offload import PipelineOptions, disk, load_offloaded
from tests.tiny_models import FAMILIES

PROMPTS = [[3, 5, 7, 9, 11, 13, 15], [2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24], [1, 2]]
TIGHT = 1_900_000  # bytes: forces the tiny models' experts to stream
GROUP = 8  # divides every tiny model's dims (expert intermediate 32 or 48, latent ranks 16 and 24)
EVERYTHING = ("shared", "attention", "lm_head")


KLOTSKI = PipelineOptions(2, "hot", hot_first=True)


def _streamed_tokens_equal_in_memory(path, options=KLOTSKI):
    expected = generate(load_model(path).model, PROMPTS, 10).tokens
    model = load_offloaded(path, TIGHT, options=options, sequences=3, max_slots=64)
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
    """Whole-layer prefetch loads every expert of every layer per forward whatever the routing, so
    the bytes read compare like for like: packed 4-bit at group 32 is (0.5 + 4/32) / 2 = 0.3125 of
    bf16 per weight; routers and norms stay dense."""
    source = tiny_checkpoint("mixtral", dtype=torch.bfloat16)
    quantized = quantize_checkpoint(source, tmp_path / "q4", 4, 32, EVERYTHING).out_dir
    read = {}
    for name, path in (("bf16", source), ("q4", quantized)):
        # 620 kB: just above the bf16 model's minimum, so every expert streams
        options = PipelineOptions(1, "layer", hot_first=False)
        model = load_offloaded(path, 620_000, options=options, max_slots=64)
        try:
            before = model.reader.stats.bytes_read
            generate(model, PROMPTS[:1], 4)
            read[name] = model.reader.stats.bytes_read - before
        finally:
            model.close()
    assert read["bf16"] > 0
    assert 0.3 < read["q4"] / read["bf16"] < 0.33
