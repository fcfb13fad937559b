"""The plan document: one writer and one reader, round-trip, slots as a runtime consumes them, and
one clear error for a plan of another version, cluster or model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from shunter.errors import ShunterError
from shunter.plan.cluster import load_cluster
from shunter.plan.document import (
    PLAN_VERSION,
    check_model_against,
    check_plan_against,
    check_trace_against,
    document_from_plan,
    load_plan,
    model_info_of_trace,
    read_plan,
    write_plan,
)
from shunter.plan.planner import PlanOptions, plan_colocated, plan_exclusive
from shunter.trace.synthetic import zipf_trace

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture(scope="module")
def cluster():
    return load_cluster(EXAMPLES / "cluster-homogeneous.toml")


@pytest.fixture(scope="module")
def trace():
    return zipf_trace(3, 1024, 8, 2, 1.4, 0.5, 0)


def _document(plan, traces, include_rounds=False):
    return document_from_plan(
        plan, tuple(model_info_of_trace(t) for t in traces), {"trace": "t.npz"}, include_rounds
    )


@pytest.mark.parametrize("replicate", [False, True])
@pytest.mark.parametrize("include_rounds", [False, True])
def test_written_then_read_plan_equals_the_plan(cluster, trace, tmp_path, replicate, include_rounds):
    plan = plan_exclusive(cluster, trace, PlanOptions(replicate=replicate, baselines=False))
    document = _document(plan, [trace], include_rounds)
    write_plan(document, tmp_path / "plan.json")
    again = load_plan(tmp_path / "plan.json")
    assert again == document
    assert again.version == PLAN_VERSION
    for layer, layer_plan in enumerate(plan.layers):
        # the oracle is the planner's own Placement: slots give back its shares [E, n]
        np.testing.assert_allclose(again.slots(layer).shares(), layer_plan.placements[0].shares, atol=1e-6)
        assert again.predicted_layer_s[layer] == pytest.approx(layer_plan.layer_time_s)
    if include_rounds:
        assert again.schedules[0] is not None
        for name in ("round_of", "src", "dst", "bytes", "rate_bytes_s"):
            written = getattr(plan.layers[0].dispatch.schedule, name)
            np.testing.assert_array_equal(getattr(again.schedules[0], name), written)
    # and written again, the JSON is the same
    assert again.to_dict() == json.loads((tmp_path / "plan.json").read_text())


def test_the_written_plan_keeps_every_key_the_planner_reports(cluster, trace):
    plan = plan_exclusive(cluster, trace, PlanOptions(baselines=False))
    before = plan.to_dict()
    after = _document(plan, [trace]).to_dict()
    assert set(before) <= set(after)
    for old, new in zip(before["layers"], after["layers"], strict=True):
        assert set(old) <= set(new)
        assert old["placement"] == new["placement"]


def test_colocated_plan_has_two_slot_tables(cluster, trace):
    other = zipf_trace(3, 1024, 8, 2, 0.8, 0.5, 1)
    plan = plan_colocated(cluster, trace, other, PlanOptions(baselines=False))
    document = read_plan(_document(plan, [trace, other]).to_dict(), "plan")
    assert document.mode == "colocated"
    for layer_plan, entry in zip(plan.layers, document.layers, strict=True):
        assert len(entry.slots) == 2
        assert all(slots.is_exclusive for slots in entry.slots)
        np.testing.assert_array_equal(
            entry.slots[1].device_of_expert(), layer_plan.placements[1].shares.argmax(axis=1)
        )


def test_a_version_1_plan_is_read_with_slots_from_its_placement(cluster, trace):
    plan = plan_exclusive(cluster, trace, PlanOptions(replicate=True, baselines=False))
    legacy = plan.to_dict()  # what version 1 wrote: no version, no slots, no models
    document = read_plan(legacy, "old.json")
    assert document.version == 1 and document.models == (None,)
    for layer_plan, entry in zip(plan.layers, document.layers, strict=True):
        np.testing.assert_allclose(entry.slots[0].shares(), layer_plan.placements[0].shares, atol=1e-6)


def _plan_dict(cluster, trace):
    return _document(plan_exclusive(cluster, trace, PlanOptions(baselines=False)), [trace]).to_dict()


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d.update(version=3), "version is 3; this Shunter reads plan versions 1, 2"),
        (lambda d: d.update(version="2"), "version is '2'"),
        (lambda d: d["layers"][0]["slots"][0].update(device=[99] * 8), "slots[0].device: device index"),
        (lambda d: d["layers"][0]["slots"][0].update(share=[0.5] * 8), "shares sum to 0.5, expected 1"),
        (lambda d: d["layers"][0]["slots"][0].update(share=[float("nan")] * 8), "positive finite"),
        (lambda d: d["layers"][0]["slots"][0].pop("expert"), "expected device, expert and share"),
        (lambda d: d["layers"][0].pop("slots"), "layers[0].slots: expected 1 slot table"),
        (lambda d: d["models"][0].update(num_experts=16), "the model has 16 experts"),
        (lambda d: d["options"].update(bytes_per_token=-1), "options.bytes_per_token"),
        (lambda d: d.update(mode="sharded"), "mode is 'sharded'"),
    ],
)
def test_a_bad_plan_is_one_clear_error_naming_the_field(cluster, trace, edit, message):
    document = _plan_dict(cluster, trace)
    edit(document)
    with pytest.raises(ShunterError) as raised:
        read_plan(document, "plan.json")
    assert str(raised.value).startswith("plan.json: ") and message in str(raised.value)


def test_a_plan_for_another_cluster_or_model_is_refused(cluster, trace):
    document = read_plan(_plan_dict(cluster, trace), "plan.json")
    four = load_cluster(EXAMPLES / "cluster-emulated-4.toml")
    with pytest.raises(ShunterError, match="plan is for a cluster of 8 devices"):
        check_plan_against(document, four, "four.toml")
    with pytest.raises(ShunterError, match="num_experts is 16"):
        check_trace_against(document, zipf_trace(3, 64, 16, 2, 1.0, 0.5, 0), "wide.npz")
    with pytest.raises(ShunterError, match="top_k is 3"):
        check_trace_against(document, zipf_trace(3, 64, 8, 3, 1.0, 0.5, 0), "k3.npz")
    with pytest.raises(ShunterError, match=r"model\.safetensors has 8 experts in 6 MoE layers"):
        check_model_against(document, 6, 8, "model.safetensors")


def test_a_plan_that_is_not_json_or_missing_is_one_line(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ShunterError, match=r"bad\.json: not valid JSON"):
        load_plan(tmp_path / "bad.json")
    with pytest.raises(ShunterError, match="plan file not found"):
        load_plan(tmp_path / "missing.json")
