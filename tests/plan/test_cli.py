"""`shunter schedule` and `shunter plan` through cli.main: outputs, files, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from shunter.cli import main
from shunter.trace.synthetic import zipf_trace

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
HOMOGENEOUS = str(EXAMPLES / "cluster-homogeneous.toml")
MIXED = str(EXAMPLES / "cluster-mixed.toml")


@pytest.fixture(scope="module")
def traces(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("traces")
    paths = {}
    for name, experts, skew, seed in (("a", 8, 1.2, 0), ("b", 8, 0.8, 1), ("wide", 16, 1.2, 2)):
        path = folder / f"{name}.npz"
        zipf_trace(2, 512, experts, 2, skew, 0.6, seed).save(path)
        paths[name] = str(path)
    return paths


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def save_matrix(tmp_path: Path, matrix: np.ndarray) -> str:
    path = tmp_path / "traffic.npy"
    np.save(path, matrix)
    return str(path)


# ---------------------------------------------------------------------------------------------
# shunter schedule


def test_schedule_json_has_makespan_bound_rounds_and_baselines(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Oracle: equal ports, so makespan == lower bound; the documented keys are present."""
    traffic = save_matrix(tmp_path, np.random.default_rng(0).integers(0, 10**6, (6, 6)))
    code, out, _ = run_cli(["schedule", traffic, "--bandwidth", "100Gbit/s", "--json"], capsys)
    assert code == 0
    result = json.loads(out)
    assert result["makespan_s"] == pytest.approx(result["lower_bound_s"], rel=1e-9)
    assert result["rounds"] > 0
    assert set(result["baselines"]) == {"random_order_s", "shortest_first_s", "fair_share_s"}


def test_schedule_prints_a_table_with_one_bandwidth_per_device(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Oracle: the table names the bound, the plan and the three baselines."""
    traffic = save_matrix(tmp_path, np.ones((4, 4)) * 1e6)
    code, out, _ = run_cli(
        ["schedule", traffic, "--bandwidth", "100Gbit/s,100Gbit/s,40Gbit/s,40Gbit/s"], capsys
    )
    assert code == 0
    for name in ("lower bound", "planned", "random order", "shortest first", "fair share"):
        assert name in out


@pytest.mark.parametrize(
    ("matrix", "message"),
    [
        (np.ones((3, 4)), "square"),
        (np.array([[0.0, -1.0], [1.0, 0.0]]), "negative"),
        (np.array([[0.0, np.nan], [1.0, 0.0]]), "finite"),
    ],
)
def test_schedule_rejects_bad_traffic(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], matrix: np.ndarray, message: str
) -> None:
    """Oracle: one line naming the file and the problem, exit status 2."""
    code, _, err = run_cli(["schedule", save_matrix(tmp_path, matrix), "--bandwidth", "1Gbit/s"], capsys)
    assert code != 0
    assert message in err and "traffic.npy" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("bandwidth", "message"), [("0Gbit/s", "must be positive"), ("1Gbit/s,2Gbit/s", "2 bandwidths for 3")]
)
def test_schedule_rejects_bad_bandwidth(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], bandwidth: str, message: str
) -> None:
    """Oracle: the message names --bandwidth and what was expected."""
    traffic = save_matrix(tmp_path, np.ones((3, 3)))
    code, _, err = run_cli(["schedule", traffic, "--bandwidth", bandwidth], capsys)
    assert code != 0 and "--bandwidth" in err and message in err


def test_schedule_reports_a_missing_file(capsys: pytest.CaptureFixture[str]) -> None:
    """Oracle: the path and 'not found'."""
    code, _, err = run_cli(["schedule", "/nonexistent/t.npy", "--bandwidth", "1Gbit/s"], capsys)
    assert code != 0 and "not found" in err


# ---------------------------------------------------------------------------------------------
# shunter plan


def test_plan_prints_one_row_per_layer(traces: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    """Oracle: the trace has 2 MoE layers; equal devices get the case 1 placement."""
    code, out, _ = run_cli(["plan", "--cluster", HOMOGENEOUS, "--trace", traces["a"]], capsys)
    assert code == 0
    assert "case 1" in out and "bound ms" in out
    rows = [line for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert len(rows) == 2


def test_plan_writes_the_json_it_prints(
    traces: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Oracle: --out holds the same document as --json, and no temporary file is left beside it."""
    out_path = tmp_path / "plans" / "plan.json"
    code, out, _ = run_cli(
        ["plan", "--cluster", MIXED, "--trace", traces["a"], "--json", "--out", str(out_path)], capsys
    )
    assert code == 0
    assert json.loads(out_path.read_text()) == json.loads(out)
    assert [p.name for p in out_path.parent.iterdir()] == ["plan.json"]
    layer = json.loads(out)["layers"][0]
    assert layer["dispatch"]["makespan_s"] >= layer["dispatch"]["lower_bound_s"] * (1 - 1e-9)
    assert "case 2" in layer["placement"]["strategy"]


def test_plan_colocates_two_models(traces: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    """Oracle: mixed devices use the case 4 heuristic; each device gets one expert of each model."""
    code, out, _ = run_cli(
        ["plan", "--cluster", MIXED, "--trace", traces["a"], "--colocate", traces["b"], "--json"], capsys
    )
    assert code == 0
    placement = json.loads(out)["layers"][0]["placement"]
    assert "case 4" in placement["strategy"]
    assert sorted(placement["device_of_expert_a"]) == list(range(8))
    assert sorted(placement["device_of_expert_b"]) == list(range(8))


def test_plan_replicates_hot_experts(traces: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    """Oracle: Lina's packing balances the skewed layer better than one expert per device."""
    code, out, _ = run_cli(
        ["plan", "--cluster", HOMOGENEOUS, "--trace", traces["wide"], "--replicate", "--json"], capsys
    )
    assert code == 0
    for layer in json.loads(out)["layers"]:
        loads = layer["replication"]["max_over_mean_load"]
        assert loads["lina"] < loads["none"]


def test_plan_rejects_a_cluster_with_zero_bandwidth(
    traces: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Oracle: one line naming the file, the device and the field."""
    cluster = tmp_path / "zero.toml"
    cluster.write_text('[[devices]]\ncount = 8\nbandwidth = "0Gbit/s"\n')
    code, _, err = run_cli(["plan", "--cluster", str(cluster), "--trace", traces["a"]], capsys)
    assert code != 0 and "zero.toml: devices[0].bandwidth" in err


def test_plan_rejects_an_expert_id_beyond_the_number_of_experts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Oracle: the trace loader names the file and the valid range."""
    trace = tmp_path / "bad.npz"
    ids = np.array([[[0, 1], [2, 7]]], dtype=np.int32)
    np.savez(trace, expert_ids=ids, gate_weights=np.ones(ids.shape, np.float32), num_experts=np.int64(4))
    code, _, err = run_cli(["plan", "--cluster", HOMOGENEOUS, "--trace", str(trace)], capsys)
    assert code != 0 and "bad.npz" in err and "[0, 4)" in err


@pytest.mark.parametrize(
    "extra", [["--colocate", "WIDE"], ["--max-experts-per-device", "1"]], ids=["colocate", "memory"]
)
def test_plan_rejects_fewer_devices_than_the_placement_needs(
    traces: dict[str, str], capsys: pytest.CaptureFixture[str], extra: list[str]
) -> None:
    """Oracle: 16 experts on 8 devices, one per device (colocation or memory limit), cannot fit."""
    extra = [traces["wide"] if arg == "WIDE" else arg for arg in extra]
    code, _, err = run_cli(["plan", "--cluster", HOMOGENEOUS, "--trace", traces["wide"], *extra], capsys)
    assert code != 0 and "fewer devices than the placement needs" in err
