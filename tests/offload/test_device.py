"""The device path (copy stream, events, pinned host tier) and the host tier, exercised on the CPU.

CI has no GPU: `ComputeDevice("cpu", copies=True)` runs the GPU path's code with torch's CPU
streams and events (no-ops with the CUDA interface) and real copies. Oracle: the in-memory
executor's greedy tokens.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from shunter.cli import main
from shunter.errors import ShunterError
from shunter.model import generate, load_model
from shunter.model.spec import load_spec
from shunter.model.weights import AttentionWeights, MLPWeights, map_tensors
from shunter.offload import ComputeDevice, PipelineOptions, disk, load_offloaded
from shunter.offload.device import resolve_device
from shunter.offload.placement import plan_placement
from tests.tiny_models import FAMILIES

PROMPTS = [[3, 5, 7, 9, 11, 13, 15], [2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24], [1, 2]]
TIGHT = 1_900_000  # bytes: above the tiny models' minimum working set, far below their size


@pytest.mark.parametrize("family", FAMILIES)
def test_the_copy_path_with_a_host_tier_gives_the_in_memory_tokens(tiny_checkpoint, family, monkeypatch):
    monkeypatch.setattr(disk, "POOLED_MIN_BYTES", 0)  # copies out of reused buffers, as on a GPU
    path = tiny_checkpoint(family)
    expected = generate(load_model(path).model, PROMPTS, 10).tokens
    spec = load_spec(path)
    host = 6 * spec.expert_parameters() * 4  # room for six fp32 experts in host RAM
    device = ComputeDevice("cpu", copies=True)
    model = load_offloaded(
        path, TIGHT, options=PipelineOptions(2, "hot"), sequences=3, max_slots=64,
        device=device, host_memory_bytes=host,
    )  # fmt: skip
    try:
        assert len(model.placement.host_experts) == min(6, spec.num_moe_layers * spec.num_experts)
        assert generate(model, PROMPTS, 10).tokens == expected
        assert model.streamer.expert_loads > 0
    finally:
        model.close()


def test_the_host_tier_serves_its_experts_without_reading_the_disk(tiny_checkpoint):
    path = tiny_checkpoint("mixtral")
    spec = load_spec(path)
    expected = generate(load_model(path).model, PROMPTS, 8).tokens
    every_expert = spec.num_moe_layers * spec.num_experts * spec.expert_parameters() * 4
    read = {}
    for host in (0, every_expert):
        model = load_offloaded(
            path, TIGHT, options=PipelineOptions(2, "hot"), sequences=3, max_slots=64, host_memory_bytes=host
        )
        try:
            at_load = model.reader.stats.bytes_read
            assert generate(model, PROMPTS, 8).tokens == expected
            read[host] = model.reader.stats.bytes_read - at_load
            assert model.streamer.expert_loads > 0
        finally:
            model.close()
    expert_bytes = spec.expert_parameters() * 4
    assert read[0] >= 8 * expert_bytes  # without a host tier, experts stream from disk
    assert read[every_expert] < expert_bytes  # with one, only blocks that did not fit are read


def test_the_host_tier_takes_the_most_popular_experts_the_device_does_not_hold(tiny_checkpoint):
    spec = load_spec(tiny_checkpoint("mixtral"))
    popularity = np.arange(spec.num_moe_layers * spec.num_experts, dtype=float).reshape(
        spec.num_moe_layers, spec.num_experts
    )  # later experts of later layers are more popular
    expert = spec.expert_parameters() * 4
    fits = plan_placement(spec, 10**9, 4, 0, 0)
    minimum = fits.base_bytes + fits.working_set_bytes
    blocks = sum(spec.block_parameters(i) * 4 for i in range(spec.num_layers))
    # the device pins every block and the most popular expert; the host takes the next three
    placement = plan_placement(
        spec, minimum + blocks + expert, 4, 0, 0, popularity, host_budget_bytes=3 * expert
    )
    last = spec.num_layers - 1, spec.num_experts - 1
    assert placement.resident_experts == frozenset({last})
    assert placement.host_experts == frozenset({(last[0], last[1] - i) for i in (1, 2, 3)})
    assert placement.host_bytes == 3 * expert and placement.host_blocks == frozenset()
    # with room for every expert, the blocks the device does not hold come next
    tight = plan_placement(spec, minimum, 4, 0, 0, popularity, host_budget_bytes=10**9)
    assert tight.host_blocks == frozenset(range(spec.num_layers)) - tight.resident_blocks
    assert len(tight.host_experts) == spec.num_moe_layers * spec.num_experts - len(tight.resident_experts)
    assert tight.host_bytes <= 10**9


def test_an_upload_is_a_copy_with_an_event_and_ready_hands_it_over():
    host = MLPWeights(torch.randn(4, 3), torch.randn(3, 2))
    uploaded = ComputeDevice("cpu", copies=True).upload(host)
    assert uploaded.event is not None
    assert uploaded.weights.gate_up.data_ptr() != host.gate_up.data_ptr()
    ready = ComputeDevice("cpu", copies=True).ready(uploaded)
    assert torch.equal(ready.gate_up, host.gate_up) and torch.equal(ready.down, host.down)
    in_place = ComputeDevice("cpu").upload(host)  # on the CPU proper nothing moves
    assert in_place.event is None and in_place.weights is host


def test_map_tensors_moves_every_tensor_and_keeps_the_missing_ones_missing():
    weights = MLPWeights(torch.ones(4, 2), torch.zeros(2, 2))
    doubled = map_tensors(weights, lambda t: t + 1)
    assert torch.equal(doubled.gate_up, torch.full((4, 2), 2.0)) and torch.equal(
        weights.gate_up, torch.ones(4, 2)
    )
    attention = map_tensors(AttentionWeights(q=torch.ones(1)), lambda t: t * 3)
    assert attention.q.item() == 3.0 and attention.k is None


def test_a_device_this_machine_cannot_use_is_a_clear_error():
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(ShunterError, match=r"device cuda: .*no usable CUDA GPU"):
            resolve_device("cuda")
    with pytest.raises(ShunterError, match="device: expected cpu, cuda"):
        resolve_device("gpu0")


def test_generate_with_a_host_tier_on_the_command_line(tiny_checkpoint, capsys):
    path = str(tiny_checkpoint("mixtral"))
    argv = ["generate", path, "--prompt-ids", "1,2,3", "--max-new-tokens", "6", "--json"]
    assert main(argv) == 0
    in_memory = json.loads(capsys.readouterr().out)
    assert main([*argv, "--memory", "1.9MB", "--host-memory", "4MiB", "--device", "cpu"]) == 0
    tiered = json.loads(capsys.readouterr().out)
    assert tiered["engine"] == "offload" and tiered["generated_ids"] == in_memory["generated_ids"]
    assert tiered["host_memory_budget_bytes"] == 4 << 20 and 0 < tiered["host_tier_bytes"] <= 4 << 20
    assert main([*argv, "--memory", "1.9MB", "--host-memory", "-1"]) == 2
    assert "--host-memory" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main([*argv, "--memory", "1.9MB", "--device", "cuda"]) == 2
        assert "no usable CUDA GPU" in capsys.readouterr().err
