"""`shunter bench a2a`: bad input fails before anything is created; a small run on the emulated
cluster reports every strategy beside the bound and the prediction, and leaves nothing behind."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from shunter.cli import main
from shunter.plan.schedule import simulate_baseline

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("tc") is None,
    reason="the emulated cluster needs root, ip and tc",
)


def _namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--hosts", "4", "--bandwidth", "0"], "bandwidth must be positive"),
        (["--hosts", "4", "--bandwidth", "1Gbit/s,1Gbit/s"], "2 bandwidths for 4 hosts"),
        (["--hosts", "1", "--bandwidth", "1Gbit/s"], "at least 2 hosts"),
        (["--hosts", "2", "--bandwidth", "1Gbit/s", "--trace", "/nonexistent.npz"], "trace file not found"),
    ],
)
def test_bad_input_is_one_line(capsys, argv, message):
    assert main(["bench", "a2a", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_plan_for_fewer_devices_than_hosts(tmp_path, capsys):
    plan = tmp_path / "plan.json"
    cluster = tmp_path / "c.toml"
    cluster.write_text(
        '[[devices]]\ncount = 2\nbandwidth = "1Gbit/s"\ncompute = "1TFLOP/s"\nmemory = "1GiB"\n'
    )
    assert main(["plan", "--cluster", str(cluster), "--out", str(plan)]) == 0
    capsys.readouterr()
    assert main(["bench", "a2a", "--hosts", "4", "--bandwidth", "1Gbit/s", "--plan", str(plan)]) == 2
    assert "places experts on 2 devices but --hosts is 4" in capsys.readouterr().err


def test_not_root(monkeypatch, capsys):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert main(["bench", "a2a", "--hosts", "2", "--bandwidth", "1Gbit/s"]) == 2
    assert "needs root" in capsys.readouterr().err


@needs_root
def test_small_run_reports_every_strategy_and_cleans_up(tmp_path):
    before = _namespaces()
    out = tmp_path / "a2a.json"
    result = subprocess.run(
        [sys.executable, "-m", "shunter.cli", "bench", "a2a", "--hosts", "2", "--bandwidth", "400Mbit/s",
         "--layers", "1", "--tokens", "512", "--reps", "2", "--warmup", "0", "--probe-bytes", "400000",
         "--port", "29541", "--json", "--out", str(out)],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report == json.loads(out.read_text())
    layer = report["layers"][0]
    assert set(layer["strategies"]) == {"all_to_all", "scheduled", "random_order"}
    for entry in layer["strategies"].values():
        # Nothing moves faster than its ports allow (5% for tbf's burst).
        assert entry["median_s"] >= 0.95 * layer["lower_bound_shaped_s"]
        assert entry["predicted_s"] > 0
    assert layer["schedule_over_bound"] == pytest.approx(layer["strategies"]["scheduled"]["over_bound"])
    assert report["calibration"]["shared_port_efficiency"] == 1.0  # two hosts: no port to share
    assert _namespaces() == before


def test_calibration_line_recovers_startup_and_efficiency():
    from shunter.parallel.a2a import fit_startup_and_efficiency

    fluid = np.array([0.25, 0.5, 1.0])
    efficiency, startup = fit_startup_and_efficiency(fluid, 0.03 + fluid / 0.8)
    assert efficiency == pytest.approx(0.8) and startup == pytest.approx(0.03)
    # a line that would start before zero is fitted through the origin: slope = sum(f m) / sum(f f)
    measured = np.array([0.2, 0.6, 1.3])
    efficiency, startup = fit_startup_and_efficiency(fluid, measured)
    assert startup == 0.0
    assert efficiency == pytest.approx((fluid @ fluid) / (fluid @ measured))


def test_shared_port_efficiency_solves_the_closed_form_incast():
    from shunter.parallel.a2a import MIN_PORT_SHARE, solve_share
    from shunter.sim.cost import sender_queue_time_s

    # Ranks 1 and 2 each send S bytes to rank 0, every port B bytes/s: both flows share port 0, so
    # the fluid time is 2 S / (c B) for a shared-port efficiency c.
    size, rate = 8e6, 50e6
    traffic = np.zeros((3, 3))
    traffic[1, 0] = traffic[2, 0] = size
    bandwidth = np.full(3, rate)

    def random_order_s(share):
        return sender_queue_time_s(traffic, bandwidth, "random_order", 0, 0.0, share)

    for share in (0.95, 0.7, 0.3):
        assert solve_share(random_order_s, 2 * size / (share * rate)) == pytest.approx(share, rel=1e-6)
    # faster than a fluid: 1; slower than the floor explains: the floor
    assert solve_share(random_order_s, size / rate) == 1.0
    assert solve_share(random_order_s, 1e3) == MIN_PORT_SHARE


def test_the_calibration_seed_is_the_order_where_flows_meet_the_most():
    from shunter.parallel.a2a import most_contended_seed

    def growth(traffic, bandwidth, seed):
        times = [
            simulate_baseline(
                traffic, bandwidth, "random_order", seed=seed, shared_port_efficiency=c
            ).makespan_s
            for c in (0.8, 1.0)
        ]
        return times[0] / times[1]

    uniform, bandwidth = np.full((4, 4), 4e6), np.array([50e6, 40e6, 25e6, 20e6])
    chosen = most_contended_seed(uniform, bandwidth)
    assert growth(uniform, bandwidth, chosen) == max(growth(uniform, bandwidth, s) for s in range(16)) > 1.1
    # a shift permutation: one flow per receiver whatever the order, so no seed beats seed 0
    shift = np.roll(np.eye(4), 1, axis=1) * 4e6
    assert most_contended_seed(shift, bandwidth) == 0
