"""ClusterSpec from TOML: units, the count shorthand, and errors that name the file and field."""

from __future__ import annotations

from pathlib import Path

import pytest

from shunter.errors import ShunterError
from shunter.plan.cluster import load_cluster
from shunter.units import parse_compute

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cluster.toml"
    path.write_text(text)
    return path


def test_homogeneous_example_has_eight_equal_devices() -> None:
    """Oracle: examples/cluster-homogeneous.toml, 8 x 100 Gbit/s = 12.5e9 B/s, 312 TFLOP/s, 80 GiB."""
    cluster = load_cluster(EXAMPLES / "cluster-homogeneous.toml")
    assert cluster.num_devices == 8 and cluster.is_homogeneous
    assert cluster.devices[0].name == "a100-0"
    assert cluster.devices[0].bandwidth_bytes_s == 12.5e9
    assert cluster.devices[0].compute_flop_s == 312e12
    assert cluster.devices[0].memory_bytes == 80 * 2**30


def test_mixed_example_has_aurora_port_types() -> None:
    """Oracle: examples/cluster-mixed.toml, two each of 100/80/50/40 Gbit/s."""
    cluster = load_cluster(EXAMPLES / "cluster-mixed.toml")
    assert not cluster.is_homogeneous
    assert sorted(set((cluster.bandwidth_bytes_s * 8 / 1e9).tolist())) == [40.0, 50.0, 80.0, 100.0]


def test_compute_accepts_human_units() -> None:
    """Oracle: SI prefixes."""
    assert parse_compute("312TFLOP/s") == 312e12
    assert parse_compute("1.5 PFLOPS") == 1.5e15
    assert parse_compute(2e9) == 2e9


def test_zero_bandwidth_names_the_file_device_and_field(tmp_path: Path) -> None:
    """Oracle: the message names cluster.toml, devices[1] and bandwidth."""
    path = write(tmp_path, '[[devices]]\nbandwidth = "100Gbit/s"\n[[devices]]\nbandwidth = "0Gbit/s"\n')
    with pytest.raises(
        ShunterError, match=r"cluster\.toml: devices\[1\]\.bandwidth: bandwidth must be positive"
    ):
        load_cluster(path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "expected one or more"),
        ('[[devices]]\ncompute = "1TFLOP/s"\n', r"devices\[0\]\.bandwidth: missing"),
        ('[[devices]]\nbandwidth = "1Gbit/s"\nbandwith = "2Gbit/s"\n', "unknown field 'bandwith'"),
        ('[[devices]]\nbandwidth = "1Gbit/s"\ncount = 0\n', r"devices\[0\]\.count"),
        ('[[devices]]\nbandwidth = "1Gbit/s"\ncompute = "fast"\n', r"devices\[0\]\.compute"),
        ('[[devices]]\nbandwidth = "1Gbit/s"\nmemory = "0GiB"\n', r"devices\[0\]\.memory"),
        (
            '[[devices]]\nname = "x"\nbandwidth = "1Gbit/s"\n' * 2,
            "twice",
        ),
        ("[[devices]\n", "not valid TOML"),
    ],
)
def test_bad_cluster_files_raise_one_clear_error(tmp_path: Path, text: str, message: str) -> None:
    """Oracle: each mistake gets a ShunterError saying what is wrong."""
    with pytest.raises(ShunterError, match=message):
        load_cluster(write(tmp_path, text))
