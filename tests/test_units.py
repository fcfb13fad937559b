"""User-facing units: b is a bit and B a byte, as everywhere else; ambiguous spellings are refused."""

from __future__ import annotations

import pytest

from shunter.errors import ShunterError
from shunter.units import parse_bandwidth, parse_bytes, parse_compute, parse_rates, parse_seconds


@pytest.mark.parametrize(
    "text, bytes_per_s",
    [
        ("100Gbit/s", 100e9 / 8),
        ("100Gb/s", 100e9 / 8),  # b = bit: before, this was read as 100 GB/s (800 Gbit/s)
        ("100Gb", 100e9 / 8),
        ("100Gbps", 100e9 / 8),  # before, refused
        ("400mbit", 400e6 / 8),  # tc's spelling
        ("12.5GB/s", 12.5e9),
        ("12.5GBps", 12.5e9),
        ("800MiB/s", 800 * 2**20),
        ("1e9", 1e9),
        (1e9, 1e9),
    ],
)
def test_bandwidth_spellings_follow_the_usual_conventions(text, bytes_per_s):
    assert parse_bandwidth(text) == pytest.approx(bytes_per_s)


@pytest.mark.parametrize(
    "text", ["100gb", "10mb/s", "5 Gibit/s x", "fast", "inf", "nan", "1e400", "0", "-1Gbit/s"]
)
def test_ambiguous_or_impossible_bandwidths_are_one_clear_error(text):
    with pytest.raises(ShunterError, match=r"^--bandwidth: "):
        parse_bandwidth(text, "--bandwidth")


def test_an_unreadable_bandwidth_lists_the_accepted_spellings():
    with pytest.raises(ShunterError, match=r"100Gbit/s, 100Gb/s, 100Gbps \(bits\); 12\.5GB/s"):
        parse_bandwidth("100gb", "bandwidth")


@pytest.mark.parametrize(
    "text, size",
    [("512MiB", 512 * 2**20), ("2GB", 2 * 10**9), ("24GiB", 24 * 2**30), ("40kB", 40_000), ("7", 7)],
)
def test_sizes(text, size):
    assert parse_bytes(text) == size


@pytest.mark.parametrize("text", ["1e400", "2gb", "2Gb", "nan", "-5MB", "1e30TB"])
def test_bad_sizes_are_one_clear_error(text):
    with pytest.raises(ShunterError, match=r"^--memory: "):
        parse_bytes(text, "--memory")


def test_durations_and_compute():
    assert parse_seconds("5ms") == pytest.approx(5e-3)
    assert parse_seconds("200us") == pytest.approx(2e-4)
    assert parse_compute("312TFLOP/s") == pytest.approx(312e12)
    for bad in ("-1ms", "1e400", "soon"):
        with pytest.raises(ShunterError, match=r"^--latency: "):
            parse_seconds(bad, "--latency")
    with pytest.raises(ShunterError, match="compute speed must be positive"):
        parse_compute("0TFLOP/s")


def test_one_rate_for_all_or_one_each():
    assert parse_rates("1Gbit/s", 3, "--bandwidth") == [125e6] * 3
    assert parse_rates("1Gbit/s,2Gbit/s", 2, "--bandwidth") == [125e6, 250e6]
    with pytest.raises(ShunterError, match="3 bandwidths for 2 hosts"):
        parse_rates("1Gbit/s,1Gbit/s,1Gbit/s", 2, "--bandwidth", "hosts")


def test_a_cluster_toml_reads_bits_as_bits(tmp_path):
    from shunter.plan.cluster import load_cluster

    path = tmp_path / "c.toml"
    path.write_text('[[devices]]\ncount = 2\nbandwidth = "100Gb"\n')
    assert load_cluster(path).devices[0].bandwidth_bytes_s == pytest.approx(100e9 / 8)
