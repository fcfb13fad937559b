"""Scale: a plan for hundreds of devices is predicted from its schedule summaries. How long that
takes (64/256/1024 devices; 1024 devices, 256 experts, 8 layers under 60 s) is measured by the
commands in docs/simulator.md, not asserted here."""

from __future__ import annotations

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


def predicted_forward_s(plan: object, cluster: object, trace: object, rebuild: bool) -> float:
    """The plan's forward time, from its schedule summaries or with every schedule rebuilt."""
    options = SimulateOptions(fair_share=False, rebuild_schedules=rebuild)
    prediction = predict_plan(plan, cluster, trace, options)  # type: ignore[arg-type]
    return prediction.total_planned_s


def test_256_devices_256_experts_predicted_from_the_summaries_match_a_rebuild() -> None:
    """Oracle: the plan's schedule summaries give the same forward time as rebuilding every schedule
    (makespan + rounds x latency is exact)."""
    plan, cluster, trace = plan_for(256, 2)
    forward = predicted_forward_s(plan, cluster, trace, rebuild=False)
    rebuilt = predicted_forward_s(plan, cluster, trace, rebuild=True)
    assert forward == pytest.approx(rebuilt, rel=1e-9)
