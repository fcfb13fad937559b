"""`shunter simulate` through cli.main: outputs, files, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shunter.cli import main
from shunter.trace.synthetic import zipf_trace

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
HOMOGENEOUS = str(EXAMPLES / "cluster-homogeneous.toml")
MIXED = str(EXAMPLES / "cluster-mixed.toml")


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Traces a and b (8 experts), short (3 layers), wide (16 experts); plans from `shunter plan`."""
    folder = tmp_path_factory.mktemp("sim")
    paths = {}
    for name, layers, experts, seed in (
        ("a", 4, 8, 0),
        ("b", 4, 8, 1),
        ("short", 3, 8, 2),
        ("wide", 4, 16, 3),
    ):
        path = folder / f"{name}.npz"
        zipf_trace(layers, 1024, experts, 2, 1.0, 0.5, seed).save(path)
        paths[name] = str(path)
    for name, extra in (
        ("plan", []),
        ("coplan", ["--colocate", paths["b"]]),
        ("splan", ["--include-schedules"]),
    ):
        out = folder / f"{name}.json"
        assert (
            main(
                [
                    "plan",
                    "--cluster",
                    HOMOGENEOUS,
                    "--trace",
                    paths["a"],
                    "--no-baselines",
                    "--out",
                    str(out),
                    *extra,
                ]
            )
            == 0
        )
        paths[name] = str(out)
    nodevices = folder / "nodevices.toml"
    nodevices.write_text('name = "empty"\n')
    paths["nodevices"] = str(nodevices)
    big = folder / "sixteen.toml"
    big.write_text('[[devices]]\ncount = 16\nbandwidth = "100Gbit/s"\n')
    paths["sixteen"] = str(big)
    return paths


def test_simulate_prints_one_row_per_layer_and_the_totals(
    files: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """Oracle: the plan has 4 layers; the table names planned and fair-share totals and memory."""
    code, out, err = run_cli(["simulate", "--cluster", HOMOGENEOUS, "--plan", files["plan"]], capsys)
    assert code == 0, err
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.lstrip().startswith("layer"))
    assert [line.split()[0] for line in lines[header + 1 : header + 5]] == ["0", "1", "2", "3"]
    assert "ms planned" in out and "fair share" in out and "fits" in out


def test_simulate_json_has_per_layer_times_with_units(
    files: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """Oracle: with no latency the planned all-to-all equals the planner's (optimal) makespans; the
    layer adds compute, so it is at least the planner's figure."""
    code, out, _ = run_cli(
        ["simulate", "--cluster", HOMOGENEOUS, "--plan", files["plan"], "--latency", "0", "--json"], capsys
    )
    assert code == 0
    result = json.loads(out)
    plan = json.loads(Path(files["plan"]).read_text())
    for row, planned in zip(result["layers"], plan["layers"], strict=True):
        expected = planned["dispatch"]["makespan_s"] + planned["combine"]["makespan_s"]
        assert row["a2a_planned_s"] == pytest.approx(expected, rel=1e-9)
        assert row["layer_planned_s"] >= row["plan_layer_time_s"] * (1 - 1e-9)
    assert result["memory"]["fits"] is True
    assert result["total_planned_s"] == pytest.approx(sum(r["layer_planned_s"] for r in result["layers"]))


def test_simulate_uses_the_schedules_a_plan_includes(
    files: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """Oracle: the included schedules are the ones the simulator would build, so the results agree."""
    code, out, _ = run_cli(
        ["simulate", "--cluster", HOMOGENEOUS, "--plan", files["splan"], "--json", "--no-fair-share"], capsys
    )
    assert code == 0
    rebuilt = json.loads(
        run_cli(["simulate", "--cluster", HOMOGENEOUS, "--plan", files["plan"], "--json"], capsys)[1]
    )
    assert json.loads(out)["total_planned_s"] == pytest.approx(rebuilt["total_planned_s"], rel=1e-9)


def test_a_schedule_that_does_not_carry_the_traffic_is_rejected(
    files: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Oracle: halving one transfer leaves bytes undelivered: the validator's message, exit 2."""
    plan = json.loads(Path(files["splan"]).read_text())
    plan["layers"][1]["dispatch"]["schedule"]["bytes"][0] /= 2
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(plan))
    code, out, err = run_cli(["simulate", "--cluster", HOMOGENEOUS, "--plan", str(broken)], capsys)
    assert code == 2 and out == ""
    assert "layers[1].dispatch.schedule does not carry" in err


def test_simulate_a_colocated_plan_interleaves_the_two_models(
    files: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """Oracle: interleaving (Aurora Table 2) is no slower than the models one after the other."""
    code, out, _ = run_cli(
        ["simulate", "--cluster", HOMOGENEOUS, "--plan", files["coplan"], "--json"], capsys
    )
    assert code == 0
    result = json.loads(out)
    assert result["mode"] == "colocated"
    assert result["total_planned_s"] <= result["colocated_sequential_s"] * (1 + 1e-12)


def test_simulate_on_other_hardware_notes_the_difference(
    files: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """Oracle: 8 devices, other speeds: allowed (a what-if), with a note."""
    code, out, _ = run_cli(
        ["simulate", "--cluster", MIXED, "--plan", files["plan"], "--no-fair-share"], capsys
    )
    assert code == 0
    assert "note: 8 of 8 devices differ" in out


def test_simulate_writes_a_png(
    files: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Oracle: the PNG signature."""
    picture = tmp_path / "layers.png"
    code, _, _ = run_cli(
        ["simulate", "--cluster", HOMOGENEOUS, "--plan", files["plan"], "--plot", str(picture)], capsys
    )
    assert code == 0
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--cluster", "{nodevices}", "--plan", "{plan}"], "expected one or more [[devices]] tables"),
        (["--cluster", "{sixteen}", "--plan", "{plan}"], "the plan is for a cluster of 8 devices"),
        (["--cluster", HOMOGENEOUS, "--plan", "{plan}", "--trace", "{short}"], "num_layers is 3, the plan"),
        (["--cluster", HOMOGENEOUS, "--plan", "{plan}", "--trace", "{wide}"], "num_experts is 16, the plan"),
        (["--cluster", HOMOGENEOUS, "--plan", "{coplan}", "--colocate", "{wide}"], "of the colocated model"),
        (["--cluster", HOMOGENEOUS, "--plan", "{a}"], "not valid JSON"),
        (
            ["--cluster", HOMOGENEOUS, "--plan", "{plan}", "--latency", "soon"],
            "--latency: cannot read 'soon'",
        ),
        (["--cluster", HOMOGENEOUS, "--plan", "{plan}", "--efficiency", "0"], "--efficiency"),
    ],
)
def test_simulate_bad_input_is_one_line_and_exit_2(
    argv: list[str], message: str, files: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """Oracle: ShunterError -> one stderr line naming the file or flag, nothing on stdout, exit 2."""
    code, out, err = run_cli(["simulate", *(a.format(**files) for a in argv)], capsys)
    assert code == 2
    assert out == ""
    assert message in err
    assert len(err.strip().splitlines()) == 1


def test_simulate_rejects_a_file_that_is_not_a_plan(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Oracle: the missing field is named."""
    path = tmp_path / "x.json"
    path.write_text(json.dumps({"layers": []}))
    code, _, err = run_cli(["simulate", "--cluster", HOMOGENEOUS, "--plan", str(path)], capsys)
    assert code == 2
    assert "field 'mode' is missing" in err


def test_simulate_finds_no_trace_when_the_plan_names_a_missing_one(
    files: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Oracle: inputs.trace points nowhere: the error says so and how to fix it."""
    plan = json.loads(Path(files["plan"]).read_text())
    plan["inputs"]["trace"] = str(tmp_path / "gone.npz")
    path = tmp_path / "p.json"
    path.write_text(json.dumps(plan))
    code, _, err = run_cli(["simulate", "--cluster", HOMOGENEOUS, "--plan", str(path)], capsys)
    assert code == 2
    assert "inputs.trace names" in err and "--trace" in err
