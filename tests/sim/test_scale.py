"""Scale: a plan for hundreds of devices is predicted in seconds. The 64/256/1024-device timings
(1024 devices, 256 experts, 8 layers under 60 s) are measured by the commands in docs/simulator.md."""

from __future__ import annotations

import time

import pytest

from shunter.network.cost import GBIT_S
from shunter.plan.cluster import ClusterSpec
from shunter.plan.document import read_plan
from shunter.plan.planner import PlanOptions, plan_exclusive
from shunter.sim.predict import SimulateOptions, predict_plan
from shunter.trace.synthetic import zipf_trace


def plan_for(num_devices: int, num_layers: int) -> tuple:
    """A plan for 256 experts (top-8, 16 tokens per device) on equal 100 Gbit/s devices."""
    cluster = ClusterSpec.uniform(num_devices, 100 * GBIT_S, 312e12)
    trace = zipf_trace(num_layers, num_devices * 16, 256, 8, 1.0, 0.5, 0)
    document = plan_exclusive(cluster, trace, PlanOptions(baselines=False)).to_dict()
    return read_plan(document, "plan"), cluster, trace


def timed_prediction(plan: object, cluster: object, trace: object, rebuild: bool) -> tuple[float, float]:
    """(seconds to predict, forward time)."""
    start = time.perf_counter()
    options = SimulateOptions(fair_share=False, rebuild_schedules=rebuild)
    prediction = predict_plan(plan, cluster, trace, options)  # type: ignore[arg-type]
    return time.perf_counter() - start, prediction.total_planned_s


def test_256_devices_256_experts_are_predicted_in_seconds_and_match_a_rebuild() -> None:
    """Oracle: the plan's schedule summaries give the same forward time as rebuilding every schedule
    (makespan + rounds x latency is exact), and in well under the time planning took."""
    plan, cluster, trace = plan_for(256, 2)
    from_summary_s, forward = timed_prediction(plan, cluster, trace, rebuild=False)
    _, rebuilt = timed_prediction(plan, cluster, trace, rebuild=True)
    assert forward == pytest.approx(rebuilt, rel=1e-9)
    assert from_summary_s < 5.0
