"""The offload engine against the in-memory executor (the oracle), on budgets that force streaming."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shunter.errors import ShunterError
from shunter.model import generate, load_model
from shunter.model.checkpoint import Checkpoint
from shunter.model.spec import load_spec
from shunter.offload import PipelineOptions, disk, load_offloaded
from shunter.offload.disk import DirectReader, HostBufferPool
from shunter.offload.placement import plan_placement
from shunter.offload.prefetcher import CorrelationPrefetcher
from shunter.sim.cost import kv_cache_bytes
from tests.tiny_models import FAMILIES

PROMPTS = [[3, 5, 7, 9, 11, 13, 15], [2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24], [1, 2]]
TIGHT = 1_900_000  # bytes: above the tiny models' minimum working set, far below their size


@pytest.mark.parametrize(
    "options",
    [PipelineOptions(1, "layer", hot_first=False), PipelineOptions(2, "hot", hot_first=True)],
    ids=["simple", "klotski"],
)
@pytest.mark.parametrize("family", FAMILIES)
def test_streamed_greedy_tokens_equal_the_in_memory_executor(tiny_checkpoint, family, options, monkeypatch):
    monkeypatch.setattr(disk, "POOLED_MIN_BYTES", 0)  # every streamed tensor in a reused buffer
    path = tiny_checkpoint(family)
    expected = generate(load_model(path).model, PROMPTS, 12).tokens
    model = load_offloaded(path, TIGHT, options=options, sequences=3, max_slots=64)
    try:
        assert generate(model, PROMPTS, 12).tokens == expected
        assert model.streamer.expert_loads > 0  # the budget really forced streaming
    finally:
        model.close()


def test_the_expert_window_bounds_what_is_held_and_keeps_the_tokens(tiny_checkpoint, monkeypatch):
    """Hot-first pipelines hold at most 2K + 1 streamed experts whatever a batch routes to (here
    three sequences route to every expert of a layer), with the same tokens and no deadlock;
    the placement reserves only that window (its minimum is below the whole-layer one)."""
    from shunter.offload import engine as engine_module
    from shunter.offload.streamer import WeightStreamer

    held = {"now": 0, "most": 0}

    class CountingStreamer(WeightStreamer):
        def _load_expert(self, layer, expert):
            weights = super()._load_expert(layer, expert)
            held["now"] += 1
            held["most"] = max(held["most"], held["now"])
            return weights

        def _release_slot(self, future):
            held["now"] -= future.exception() is None
            super()._release_slot(future)

    monkeypatch.setattr(engine_module, "WeightStreamer", CountingStreamer)
    path = tiny_checkpoint("mixtral")
    spec = load_spec(path)
    expected = generate(load_model(path).model, PROMPTS, 12).tokens
    options = PipelineOptions(2, "hot", hot_first=True)
    window = engine_module.experts_in_flight(spec, options)
    assert window == 2 * spec.top_k + 1 < spec.num_experts + spec.top_k
    model = load_offloaded(path, TIGHT, options=options, sequences=3, max_slots=64)
    try:
        assert generate(model, PROMPTS, 12).tokens == expected
        assert model.streamer.expert_loads > window
        assert 0 < held["most"] <= window
    finally:
        model.close()
    element = 4
    sizes = (spec, 10**9, element, 0, 0)
    windowed, whole = plan_placement(*sizes, in_flight_experts=window), plan_placement(*sizes)
    expert_bytes = spec.expert_parameters() * element
    assert (
        whole.working_set_bytes - windowed.working_set_bytes
        == (spec.num_experts + spec.top_k - window) * expert_bytes
    )


def test_fused_expert_rows_stream_from_their_byte_ranges(tiny_checkpoint):
    path = tiny_checkpoint("qwen3_moe", fused=True)
    expected = generate(load_model(path).model, PROMPTS, 8).tokens
    model = load_offloaded(path, TIGHT, options=PipelineOptions(3, "hot"), sequences=3, max_slots=64)
    try:
        assert generate(model, PROMPTS, 8).tokens == expected
    finally:
        model.close()


def test_direct_reads_equal_safetensors_reads(tiny_checkpoint):
    checkpoint = Checkpoint(tiny_checkpoint("mixtral"))
    reader = DirectReader()
    for name in list(checkpoint.names())[:12]:
        assert torch.equal(reader.read(checkpoint.location(name)), checkpoint.read(name))
    assert reader.stats.bytes_read == sum(
        checkpoint.location(n).num_bytes for n in list(checkpoint.names())[:12]
    )
    reader.close()


def test_pooled_reads_equal_safetensors_reads_and_reuse_only_freed_buffers(tiny_checkpoint, monkeypatch):
    monkeypatch.setattr(disk, "POOLED_MIN_BYTES", 0)
    checkpoint = Checkpoint(tiny_checkpoint("mixtral"))
    reader, pool = DirectReader(), HostBufferPool()
    name = max(checkpoint.names(), key=lambda n: checkpoint.location(n).num_bytes)
    first = reader.read(checkpoint.location(name), allocate=pool.take)
    second = reader.read(checkpoint.location(name), allocate=pool.take)
    assert torch.equal(first, checkpoint.read(name)) and torch.equal(second, checkpoint.read(name))
    assert first.data_ptr() != second.data_ptr()  # both alive: two buffers
    footprint, address = pool.allocated_bytes, second.untyped_storage().data_ptr()
    del second  # its buffer comes back, and the next read of that size lands in it
    third = reader.read(checkpoint.location(name), allocate=pool.take)
    assert third.untyped_storage().data_ptr() == address and pool.allocated_bytes == footprint
    assert torch.equal(third, checkpoint.read(name))
    reader.close()


def test_block_size_from_the_spec_matches_the_checkpoint(tiny_checkpoint):
    """Oracle: the byte sizes of the checkpoint's own tensors."""
    for family in FAMILIES:
        path = tiny_checkpoint(family)
        spec, checkpoint = load_spec(path), Checkpoint(path)
        for layer in range(spec.num_layers):
            prefix = f"model.layers.{layer}."
            names = [n for n in checkpoint.names() if n.startswith(prefix) and ".experts." not in n]
            elements = sum(int(np.prod(checkpoint.shape(n))) for n in names)
            assert spec.block_parameters(layer) == elements, (family, layer)


def test_a_budget_below_the_working_set_names_the_minimum(tiny_checkpoint):
    with pytest.raises(
        ShunterError, match=r"--memory 97\.7 KiB is below the minimum this model needs, [0-9.]+ [KM]iB"
    ):
        load_offloaded(tiny_checkpoint("mixtral"), 100_000, sequences=1, max_slots=64)


def test_a_checkpoint_truncated_while_running_is_a_clear_error(tiny_checkpoint, tmp_path):
    import shutil

    path = tmp_path / "model"
    shutil.copytree(tiny_checkpoint("mixtral"), path)
    model = load_offloaded(path, TIGHT, sequences=1, max_slots=64)
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 3])
    try:
        with pytest.raises(ShunterError, match="file ended at byte"):
            generate(model, [[1, 2, 3]], 4)
    finally:
        model.close()


def test_placement_pins_blocks_first_then_the_most_popular_experts(tiny_checkpoint):
    spec = load_spec(tiny_checkpoint("mixtral"))
    popularity = np.zeros((spec.num_moe_layers, spec.num_experts))
    popularity[1, 5] = 1.0  # one clearly hottest expert, in the second MoE layer
    plenty = plan_placement(spec, 10**9, 4, 0, 0, popularity)
    assert plenty.resident_blocks == frozenset(range(spec.num_layers))
    assert len(plenty.resident_experts) == spec.num_layers * spec.num_experts
    minimum = (
        plan_placement(spec, 10**9, 4, 0, 0).base_bytes
        + plan_placement(spec, 10**9, 4, 0, 0).working_set_bytes
    )
    blocks = sum(spec.block_parameters(i) * 4 for i in range(spec.num_layers))
    one_expert = spec.expert_parameters() * 4
    tight = plan_placement(spec, minimum + blocks + one_expert, 4, 0, 0, popularity)
    assert tight.resident_experts == frozenset({(1, 5)})


def test_the_engine_reads_prefetch_in_the_simulators_vocabulary():
    """Oracle: shunter.sim.klotski.Prefetch; its aliases map once, an unknown word is refused."""
    assert PipelineOptions(2, "hot_only").prefetch == "hot"
    assert PipelineOptions(2, "whole_layer").prefetch == "layer"
    assert PipelineOptions(2, "none").prefetch == "none"
    with pytest.raises(ValueError, match="prefetch 'all' is not one of none, hot, layer"):
        PipelineOptions(1, "all")


def test_a_batch_whose_kv_cache_cannot_fit_says_so(tiny_checkpoint):
    spec = load_spec(tiny_checkpoint("mixtral"))
    fits = plan_placement(spec, 10**9, 4, 0, 0)
    weights = fits.base_bytes + fits.working_set_bytes
    kv = kv_cache_bytes(spec.kv_bytes_per_token(4), sequences=64, context_tokens=512, layers=spec.num_layers)
    assert plan_placement(spec, weights + kv, 4, kv, 0).kv_cache_bytes == kv
    with pytest.raises(
        ShunterError, match=r"the KV cache of this batch needs [0-9.]+ MiB but only [0-9.]+ KiB"
    ):
        plan_placement(spec, weights + kv // 1000, 4, kv, 0)


def test_prefetcher_follows_the_strongest_transition():
    from shunter.trace import RoutingTrace

    # top-1 routing, layer 0 -> layer 1: expert 0 is always followed by 3, expert 1 by 2
    ids = np.array([[[0], [1], [0]], [[3], [2], [3]]])
    trace = RoutingTrace(ids, np.ones(ids.shape), 4, [0, 1])
    prefetcher = CorrelationPrefetcher(2, 4, trace)
    assert prefetcher.predict(0, None, 2) == [0, 1]
    assert prefetcher.predict(1, np.array([[0, 0]]), 1) == [3]
    assert prefetcher.predict(1, np.array([[1, 1]]), 1) == [2]


def test_generate_with_a_small_memory_budget_streams_and_gives_the_same_tokens(tiny_checkpoint, capsys):
    import json

    from shunter.cli import main

    path = str(tiny_checkpoint("mixtral"))
    assert main(["generate", path, "--prompt-ids", "1,2,3", "--max-new-tokens", "6", "--json"]) == 0
    in_memory = json.loads(capsys.readouterr().out)
    argv = ["generate", path, "--prompt-ids", "1,2,3", "--max-new-tokens", "6", "--json", "--memory", "1.9MB"]
    assert main([*argv, "--batches", "1"]) == 0
    streamed = json.loads(capsys.readouterr().out)
    assert streamed["engine"] == "offload" and in_memory["engine"] == "in-memory"
    assert streamed["generated_ids"] == in_memory["generated_ids"]
    assert streamed["bytes_read"] > 0
    assert main([*argv[:-1], "10KiB"]) == 2
    assert "below the minimum this model needs" in capsys.readouterr().err


def test_bf16_streaming_with_prepacked_resident_weights_equals_in_memory(tiny_checkpoint):
    """Oracle: the in-memory executor (also prepacked) on the same bf16 checkpoint."""
    path = tiny_checkpoint("mixtral", dtype=torch.bfloat16)
    expected = generate(load_model(path).model, PROMPTS, 10).tokens
    model = load_offloaded(path, 1_400_000, options=PipelineOptions(2, "hot"), sequences=3, max_slots=64)
    try:
        assert model.lm_head.is_mkldnn == load_model(path).model.weights.lm_head.is_mkldnn
        assert generate(model, PROMPTS, 10).tokens == expected
        assert model.streamer.expert_loads > 0
    finally:
        model.close()


def test_blocks_packed_as_they_stream_keep_the_tokens(tiny_checkpoint, monkeypatch):
    """From PACK_BLOCK_MIN_BATCHES micro-batches on, streamed blocks take the prepacked layout;
    oracle: the in-memory executor, whose resident weights are prepacked too (bf16)."""
    from shunter.offload import engine

    monkeypatch.setattr(engine, "PACK_BLOCK_MIN_BATCHES", 3)
    path = tiny_checkpoint("mixtral", dtype=torch.bfloat16)
    expected = generate(load_model(path).model, PROMPTS, 10).tokens
    # 800 kB: two of the three blocks fit beside the working set, so one streams
    model = load_offloaded(path, 800_000, options=PipelineOptions(3, "hot"), sequences=3, max_slots=64)
    try:
        assert generate(model, PROMPTS, 10).tokens == expected
        streamed = [
            layer for layer in range(model.spec.num_layers) if layer not in model.streamer.resident_blocks
        ]
        assert streamed and model._pack_blocks
        packed = model.streamer._load_block(streamed[0], True).weights.attention.q
        assert packed.is_mkldnn == load_model(path).model.weights.lm_head.is_mkldnn
    finally:
        model.close()


def test_prefetch_takes_the_whole_layer_once_the_tokens_touch_every_expert(tiny_checkpoint):
    """Hot-only prefetch loads the K hot experts, or every expert in predicted order once a
    forward's tokens are expected to touch them all: E (1 - (1 - K/E)^tokens) rounds to E."""
    path = tiny_checkpoint("mixtral")
    spec = load_spec(path)
    E, K = spec.num_experts, spec.top_k
    model = load_offloaded(
        path, TIGHT, options=PipelineOptions(2, "hot", hot_first=True), sequences=3, max_slots=64
    )
    try:
        first_all = next(t for t in range(1, 1000) if round(E * (1 - (1 - K / E) ** t)) >= E)
        assert model.prefetch_count(None) == K and model.prefetch_count(1) == K
        assert model.prefetch_count(first_all - 1) == K and model.prefetch_count(first_all) == E
    finally:
        model.close()


@pytest.mark.parametrize("family", ["qwen3_next"])
def test_streamed_expert_choices_equal_the_reference_router(tiny_checkpoint, family):
    """Oracle: transformers' router top-k on a padded two-prompt batch, recorded through the offload
    engine under a budget that streams experts (two micro-batches, so linear-attention states and
    KV rows are split between them)."""
    from transformers import AutoModelForCausalLM

    from shunter.model import Batch
    from shunter.model.generate import left_pad
    from shunter.trace import RoutingRecorder

    path = tiny_checkpoint(family)
    prompts = PROMPTS[:2]
    tokens, pads = left_pad(prompts)
    P = tokens.shape[1]
    valid = torch.arange(P)[None, :] >= pads[:, None]
    positions = (torch.arange(P)[None, :] - pads[:, None]).clamp(min=0)
    reference = AutoModelForCausalLM.from_pretrained(path).eval()
    chosen: list[torch.Tensor] = []
    hooks = [
        module.register_forward_hook(lambda _m, _i, out: chosen.append(out[2].detach().clone()))
        for module in reference.modules()
        if type(module).__name__.lower().endswith("topkrouter")
    ]
    with torch.no_grad():
        expected_logits = reference(
            input_ids=tokens, attention_mask=valid.long(), position_ids=positions
        ).logits
    for hook in hooks:
        hook.remove()

    model = load_offloaded(path, TIGHT, options=PipelineOptions(2, "hot"), sequences=2, max_slots=64)
    try:
        moe_layers = [i for i, moe in enumerate(model.spec.moe_layers) if moe]
        recorder = RoutingRecorder(moe_layers, model.spec.num_experts)
        logits = model.forward(Batch(tokens, positions, valid, 0), recorder=recorder)
        assert model.streamer.expert_loads > 0
    finally:
        model.close()
    assert (logits - expected_logits)[valid].abs().max().item() <= 1e-4
    trace = recorder.trace()
    assert len(chosen) == len(moe_layers) == trace.num_layers
    for layer, reference_ids in enumerate(chosen):
        expected = reference_ids[valid.reshape(-1)].sort(dim=-1).values
        actual = torch.from_numpy(trace.expert_ids[layer]).long().sort(dim=-1).values
        assert torch.equal(actual, expected), f"MoE layer {moe_layers[layer]}"
