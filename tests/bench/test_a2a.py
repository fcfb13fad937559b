"""`shunter bench a2a`: bad input fails before anything is created; a small run on the emulated
cluster reports every strategy beside the bound and the prediction, and leaves nothing behind."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from shunter.cli import main

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
