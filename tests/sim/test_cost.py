"""The network and compute cost model against closed forms and textbook max-min fairness."""

from __future__ import annotations

import numpy as np
import pytest

from shunter.errors import ShunterError
from shunter.model.spec import spec_from_config
from shunter.plan.schedule import Schedule, max_min_fair_rates, simulate_baseline
from shunter.sim.cost import (
    MIXTRAL_8X7B,
    ComputeModel,
    ComputeProfile,
    FluidNetwork,
    MoEShapes,
    fair_share_time_s,
    flow_time_s,
    kv_cache_bytes,
    parse_compute_profile,
    ring_allreduce_flows,
    ring_allreduce_time_s,
    schedule_time_s,
)
from shunter.sim.timeline import Collective, Compute, TimelineOptions, run_timeline
from tests.tiny_models import FAMILY_CONFIGS

# Mixtral-8x7B-v0.1's config.json as published (transformers' MixtralConfig field names).
MIXTRAL_8X7B_CONFIG = {
    "architectures": ["MixtralForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 32768,
    "model_type": "mixtral",
    "num_attention_heads": 32,
    "num_experts_per_tok": 2,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "num_local_experts": 8,
    "output_router_logits": False,
    "rms_norm_eps": 1e-05,
    "rope_theta": 1000000.0,
    "router_aux_loss_coef": 0.02,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "vocab_size": 32000,
}


def one_flow(
    src: int, dst: int, num_bytes: float, name: str = "x", after: tuple[str, ...] = ()
) -> Collective:
    return Collective(name, np.array([src]), np.array([dst]), np.array([num_bytes]), after)


def test_one_flow_takes_latency_plus_bytes_over_bandwidth() -> None:
    """Oracle: t = latency + bytes / B (closed form and through the fluid timeline)."""
    assert flow_time_s(1e6, 1e9, 1e9, 5e-6) == pytest.approx(5e-6 + 1e-3)
    timeline = run_timeline([one_flow(0, 1, 1e6)], np.full(2, 1e9), TimelineOptions("fair_share", 5e-6))
    assert timeline.makespan_s == pytest.approx(5e-6 + 1e-3, rel=1e-12)


def test_one_flow_runs_at_the_slower_of_its_two_ports() -> None:
    """Oracle: bytes / min(B_src, B_dst)."""
    timeline = run_timeline([one_flow(0, 1, 100.0)], np.array([10.0, 4.0]), TimelineOptions())
    assert timeline.makespan_s == pytest.approx(25.0)
    assert flow_time_s(100.0, 10.0, 4.0, 0.0) == pytest.approx(25.0)


def test_two_equal_flows_into_one_port_take_twice_as_long_as_one() -> None:
    """Oracle: the receiver's port is shared, each flow gets B/2."""
    bandwidth = np.full(3, 10.0)
    alone = run_timeline([one_flow(0, 2, 100.0)], bandwidth, TimelineOptions()).makespan_s
    both = Collective("x", np.array([0, 1]), np.array([2, 2]), np.array([100.0, 100.0]))
    shared = run_timeline([both], bandwidth, TimelineOptions()).makespan_s
    assert shared == pytest.approx(2 * alone)


def test_flows_from_and_to_different_ports_do_not_slow_each_other() -> None:
    """Oracle: full-duplex ports and a non-blocking core: 0->1 and 1->0 and 2->3 all run at B."""
    flows = Collective("x", np.array([0, 1, 2]), np.array([1, 0, 3]), np.array([100.0, 100.0, 100.0]))
    assert run_timeline([flows], np.full(4, 10.0), TimelineOptions()).makespan_s == pytest.approx(10.0)


def test_a_flow_joining_later_shares_the_port_from_then_on() -> None:
    """Oracle: A (10 B) alone at 1 B/s for 5 s, then A and B share at 0.5 B/s: A ends at 15 s;
    B (10 B) moves 5 B by 15 s and the rest alone: ends at 20 s."""
    ops = [
        one_flow(0, 1, 10.0, "A"),
        Compute("wait", np.array([0.0, 0.0, 5.0])),
        one_flow(2, 1, 10.0, "B", after=("wait",)),
    ]
    timeline = run_timeline(ops, np.ones(3), TimelineOptions())
    assert timeline.collective_finish_s["A"] == pytest.approx(15.0)
    assert timeline.collective_finish_s["B"] == pytest.approx(20.0)


def test_a_matching_schedule_takes_the_sum_of_its_rounds_each_with_one_latency() -> None:
    """Oracle: rounds of 2 s and 3 s (longest transfer each) with 0.5 s latency: 2.5 + 3.5 = 6 s."""
    schedule = Schedule(
        round_of=np.array([0, 0, 1]),
        src=np.array([0, 1, 0]),
        dst=np.array([1, 0, 2]),
        bytes=np.array([20.0, 10.0, 30.0]),
        rate_bytes_s=np.array([10.0, 10.0, 10.0]),
        num_rounds=2,
        num_devices=3,
        strategy="test",
    )
    assert schedule.makespan_s == pytest.approx(5.0)
    assert schedule_time_s(schedule, 0.5) == pytest.approx(6.0)
    assert list(schedule.round_durations_s(0.5)) == pytest.approx([2.5, 3.5])


def test_max_min_fairness_textbook_example_with_a_fast_sender() -> None:
    """Oracle (progressive filling by hand): port 0 sends 2 B/s to 1, 2, 3; device 4 also sends to 3.
    Receiver 3 fills first at 0.5 each; port 0 then splits its remaining 1.5 between 0->1 and 0->2."""
    src, dst = np.array([0, 0, 0, 4]), np.array([1, 2, 3, 3])
    rates = max_min_fair_rates(src, dst, np.array([2.0, 1.0, 1.0, 1.0, 1.0]))
    assert rates == pytest.approx([0.75, 0.75, 0.5, 0.5])


def test_max_min_fairness_gives_a_bottlenecked_flow_its_share_and_the_rest_to_others() -> None:
    """Oracle: 0->2 and 1->2 share receiver 2 (0.5 each); 1's other flow 1->3 then takes what
    sender 1 has left (0.5); 0's other flow 0->3 is limited by receiver 3 to 0.5."""
    src, dst = np.array([0, 1, 1, 0]), np.array([2, 2, 3, 3])
    rates = max_min_fair_rates(src, dst, np.ones(4))
    assert rates == pytest.approx([0.5, 0.5, 0.5, 0.5])
    assert rates[:2].sum() <= 1.0 + 1e-12


def test_fluid_network_all_to_all_equals_plan_fair_share_simulation() -> None:
    """Oracle: plan.schedule.simulate_baseline(fair_share), the planner's fluid model, plus one latency."""
    traffic = np.random.default_rng(3).integers(0, 10**6, (7, 7)).astype(float)
    bandwidth = np.linspace(5e8, 2e9, 7)
    expected = simulate_baseline(traffic, bandwidth, "fair_share", record=False).makespan_s + 1e-5
    timeline = run_timeline(
        [Collective.from_traffic("a2a", traffic)], bandwidth, TimelineOptions("fair_share", 1e-5)
    )
    assert timeline.makespan_s == pytest.approx(expected, rel=1e-9)
    assert fair_share_time_s(traffic, bandwidth, 1e-5) == pytest.approx(expected, rel=1e-12)


def test_fluid_network_reports_a_collective_done_when_its_last_flow_ends() -> None:
    """Oracle: tag 7's flows end at 1 s and 2 s alone on their ports; the tag completes at 2 s."""
    network = FluidNetwork(np.ones(4))
    network.add(7, np.array([0, 2]), np.array([1, 3]), np.array([1.0, 2.0]))
    assert network.advance(network.next_event_s()) == []
    assert network.advance(network.next_event_s()) == [7]
    assert network.now_s == pytest.approx(2.0)


def test_ring_allreduce_alone_takes_its_closed_form() -> None:
    """Oracle: 2 (n-1)/n * S / B on equal ports (no latency)."""
    n, size, bandwidth = 8, 64e6, 12.5e9
    src, dst, nbytes = ring_allreduce_flows(size, n, channels=3)
    timeline = run_timeline([Collective("ar", src, dst, nbytes)], np.full(n, bandwidth), TimelineOptions())
    assert timeline.makespan_s == pytest.approx(ring_allreduce_time_s(size, bandwidth, n, 0.0), rel=1e-12)
    assert timeline.makespan_s == pytest.approx(2 * 7 / 8 * size / bandwidth)


def test_compute_time_is_flops_over_speed_with_a_memory_floor() -> None:
    """Oracle: 1e12 FLOP at 1e14 * 0.5 FLOP/s = 20 ms; a tiny op cannot beat reading its 1 GB at 1 TB/s."""
    model = ComputeModel(efficiency=0.5, memory_bandwidth_bytes_s=1e12)
    assert model.op_time_s("expert", 1000.0, 1e9, 1e6, 1e14) == pytest.approx(0.02)
    assert model.op_time_s("expert", 1.0, 1e9, 1e9, 1e14) == pytest.approx(1e-3)
    assert model.op_time_s("expert", 0.0, 1e9, 1e9, 1e14) == 0.0


def test_a_measured_profile_replaces_the_flop_estimate_and_interpolates() -> None:
    """Oracle: linear between (100, 1 ms) and (300, 2 ms); extrapolated along the last segment."""
    profile = ComputeProfile({"expert": np.array([100.0, 300.0])}, {"expert": np.array([1e-3, 2e-3])})
    model = ComputeModel(profile=profile)
    assert model.op_time_s("expert", np.array([200.0, 500.0]), 1e9, 0.0, 1e14) == pytest.approx(
        [1.5e-3, 3e-3]
    )
    assert model.op_time_s("gate", 100.0, 1e9, 0.0, 1e14) == pytest.approx(1e-3)  # not profiled: FLOPs


def test_a_bad_profile_is_a_clear_error() -> None:
    """Oracle: the message names the file and the op."""
    with pytest.raises(ShunterError, match=r"p\.json: expert: tokens must increase"):
        parse_compute_profile({"expert": {"tokens": [2, 1], "seconds": [1, 1]}}, "p.json")
    with pytest.raises(ShunterError, match="unknown op 'mlp'"):
        parse_compute_profile({"mlp": {"tokens": [1], "seconds": [1]}}, "p.json")


def test_mixtral_shapes_give_its_known_sizes() -> None:
    """Oracle: Mixtral-8x7B has 176M parameters per expert (3 x 4096 x 14336) and ~46.7B in total."""
    mixtral = MoEShapes(
        name="m",
        hidden_size=4096,
        expert_intermediate_size=14336,
        num_experts=8,
        top_k=2,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
    )
    assert mixtral.expert_params == 3 * 4096 * 14336
    total = mixtral.num_layers * (8 * mixtral.expert_params + mixtral.attention_params)
    assert total == pytest.approx(46.5e9, rel=0.01)


def test_shapes_from_mixtral_config_equal_the_mixtral_preset() -> None:
    """Oracle: the MIXTRAL_8X7B preset, written from the Klotski paper's model, in every size and
    cost the simulator derives from shapes."""
    shapes = MoEShapes.from_spec(spec_from_config(MIXTRAL_8X7B_CONFIG))
    preset = MIXTRAL_8X7B
    assert shapes.expert_bytes == preset.expert_bytes
    assert shapes.attention_bytes == preset.attention_bytes
    assert shapes.gate_bytes == preset.gate_bytes
    assert shapes.weight_bytes == preset.weight_bytes
    assert shapes.kv_bytes_per_token == preset.kv_bytes_per_token
    assert shapes.token_bytes == preset.token_bytes
    assert shapes.expert_flops_per_token == preset.expert_flops_per_token
    assert shapes.gate_flops_per_token == preset.gate_flops_per_token
    assert shapes.aggregation_flops_per_token == preset.aggregation_flops_per_token
    assert shapes.attention_flops_per_token(1000.0) == preset.attention_flops_per_token(1000.0)
    assert MoEShapes.from_spec(spec_from_config(MIXTRAL_8X7B_CONFIG), name="Mixtral-8x7B") == preset


def tiny_config(family: str) -> dict[str, object]:
    """A config.json of the tests' tiny model of `family` (tests/tiny_models.py), without transformers."""
    base = dict(model_type=family, hidden_size=64, num_hidden_layers=3, vocab_size=96)
    return {**base, "num_attention_heads": 4, "num_key_value_heads": 2, **FAMILY_CONFIGS[family]}


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "olmoe"])
def test_shapes_from_a_spec_hold_as_many_kv_bytes_per_token_as_the_runtime_caches(family: str) -> None:
    """Oracle: ModelSpec.kv_bytes_per_token, what the runtime's KV cache holds (qwen3_moe's
    head_dim 32 is not hidden / heads)."""
    spec = spec_from_config(tiny_config(family))
    shapes = MoEShapes.from_spec(spec)
    assert shapes.kv_bytes_per_token == spec.kv_bytes_per_token(spec.dtype_bytes)
    assert shapes.num_layers == spec.num_moe_layers
    assert shapes.expert_params == spec.expert_parameters()


@pytest.mark.parametrize(("family", "what"), [("qwen2_moe", "shared experts"), ("deepseek_v3", "mla")])
def test_shapes_refuse_a_model_they_cannot_describe(family: str, what: str) -> None:
    """Oracle: MoEShapes has grouped-query attention and routed experts only; an estimate that drops
    Qwen2-MoE's shared experts or DeepSeek's latent attention would be silently wrong."""
    with pytest.raises(ShunterError, match=what):
        MoEShapes.from_spec(spec_from_config(tiny_config(family)))


def test_a_kv_cache_is_sequences_times_tokens_times_layers_of_one_tokens_keys_and_values() -> None:
    """Oracle: Mixtral keeps 8 KV heads of 128 in bf16, 4 KiB per token and layer: 32 sequences of
    1024 tokens at 32 layers are 4 GiB."""
    assert MIXTRAL_8X7B.kv_bytes_per_token == 4096
    assert kv_cache_bytes(MIXTRAL_8X7B.kv_bytes_per_token, 32, 1024, MIXTRAL_8X7B.num_layers) == 4 * 2**30
