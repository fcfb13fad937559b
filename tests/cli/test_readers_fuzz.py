"""Every reader of user files, fed random bytes and random JSON / TOML / NPZ structures: a clear
ShunterError or a valid result, never another exception (the property behind the bad-input matrix)."""

from __future__ import annotations

import io
import json
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shunter.commands.schedule import load_traffic
from shunter.errors import ShunterError
from shunter.plan.cluster import load_cluster, parse_cluster
from shunter.plan.document import load_plan, read_plan
from shunter.trace.routing_trace import load_trace
from shunter.units import parse_bandwidth, parse_bytes, parse_compute, parse_seconds

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
)
json_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=25,
)
# plan-shaped documents with random values where the reader looks, so the fuzz gets past the first check
plan_keys = st.sampled_from(["version", "mode", "cluster", "options", "layers", "models", "inputs"])
plan_like = st.dictionaries(plan_keys, json_values, max_size=7)
toml_values = st.integers(-(2**40), 2**40) | st.text(max_size=12) | st.floats(allow_nan=False) | st.booleans()
cluster_like = st.fixed_dictionaries(
    {},
    optional={
        "name": toml_values,
        "devices": st.lists(
            st.dictionaries(
                st.sampled_from(["name", "count", "bandwidth", "compute", "memory", "extra"]), toml_values
            ),
            max_size=3,
        ),
    },
)
arrays = st.sampled_from([np.int64, np.int32, np.float32, np.float64, np.bool_]).flatmap(
    lambda dtype: st.lists(st.integers(0, 5), min_size=0, max_size=3).map(
        lambda shape: (np.arange(int(np.prod(shape)) if shape else 1) % 7).astype(dtype).reshape(shape)
    )
)
npz_fields = st.dictionaries(
    st.sampled_from(
        ["expert_ids", "gate_weights", "num_experts", "layer_indices", "token_ids", "model", "x"]
    ),
    arrays,
    max_size=6,
)


def _accepts_or_refuses(read, *args) -> None:
    try:
        read(*args)
    except ShunterError as exc:
        message = str(exc)
        assert message and "\n" not in message.strip(), message


def _file(suffix: str, data: bytes) -> Path:
    with tempfile.NamedTemporaryFile(suffix=suffix, delete=False) as handle:
        handle.write(data)
    return Path(handle.name)


@FUZZ
@given(st.binary(max_size=300), st.sampled_from([".json", ".toml", ".npz", ".npy"]))
def test_random_bytes_are_refused_or_read_by_every_file_reader(data: bytes, suffix: str) -> None:
    path = _file(suffix, data)
    try:
        for read in (load_plan, load_cluster, load_trace, load_traffic):
            _accepts_or_refuses(read, path)
    finally:
        path.unlink()


@FUZZ
@given(json_values | plan_like)
def test_random_json_is_refused_or_read_as_a_plan(document: object) -> None:
    _accepts_or_refuses(read_plan, document, "plan.json")
    path = _file(".json", json.dumps(document).encode())
    try:
        _accepts_or_refuses(load_plan, path)
    finally:
        path.unlink()


@FUZZ
@given(cluster_like)
def test_random_cluster_tables_are_refused_or_read(document: dict) -> None:
    _accepts_or_refuses(parse_cluster, document, "cluster.toml")


@FUZZ
@given(npz_fields)
def test_random_npz_structures_are_refused_or_read_as_a_trace(fields: dict) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, **fields)
    path = _file(".npz", buffer.getvalue())
    try:
        _accepts_or_refuses(load_trace, path)
    finally:
        path.unlink()


@FUZZ
@given(arrays)
def test_random_arrays_are_refused_or_read_as_a_traffic_matrix(array: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.save(buffer, array)
    path = _file(".npy", buffer.getvalue())
    try:
        _accepts_or_refuses(load_traffic, path)
    finally:
        path.unlink()


@FUZZ
@given(st.text(max_size=20) | st.floats() | st.integers(-(2**80), 2**80))
def test_random_values_are_refused_or_read_by_every_unit_parser(value: object) -> None:
    for parse in (parse_bytes, parse_bandwidth, parse_seconds, parse_compute):
        _accepts_or_refuses(parse, value)
