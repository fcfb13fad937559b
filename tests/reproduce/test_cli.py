"""`shunter reproduce` through cli.main: the claims that reproduce today still do, every row says
why, the table and the plot, and bad input."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest

from shunter.cli import main

# The claims whose rule holds on `shunter reproduce PAPER --quick` (found by running it). A change
# that makes one of them stop reproducing fails here; one that makes another reproduce should add
# it to its list.
REPRODUCED = {
    "aurora": {
        "exclusive + homogeneous vs SJF (inference time)",
        "exclusive + mixed vs random GPU assignment (RGA)",
        "colocated + homogeneous vs Lina",
        "GPU utilisation: colocated vs Lina",
        "colocated + mixed vs Lina",
    },
    "lina": {
        "inference: layers re-planned in phase 2",
        "training: DeepSpeed backward all-to-all slowed by the allreduce",
        "training: step speedup, priority (+ micro-ops) vs DeepSpeed",
    },
    "klotski": {
        "step ratio: + multiple batches",
        "profiler: one layer, 10 x 64 (Klotski)",
        "profiler: the same with a simple overlap pipeline",
        "planner: smallest bubble-free n (inequalities 4-7), batch 64",
    },
}


@pytest.fixture(scope="module")
def quick_json() -> dict[str, dict]:
    """`shunter reproduce PAPER --quick --json` of every paper, run once for the module."""
    results = {}
    for paper in REPRODUCED:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert main(["reproduce", paper, "--quick", "--json"]) == 0
        results[paper] = json.loads(out.getvalue())
    return results


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("paper", sorted(REPRODUCED))
def test_the_claims_that_reproduce_today_still_reproduce(paper: str, quick_json: dict[str, dict]) -> None:
    """Oracle: REPRODUCED, the rows whose rule held when the experiments moved to shunter.reproduce."""
    rows = {row["label"]: row for row in quick_json[paper]["rows"]}
    assert REPRODUCED[paper] <= set(rows), "a claim's label changed or the claim is gone"
    lost = sorted(label for label in REPRODUCED[paper] if not rows[label]["reproduced"])
    assert lost == [], [f"{name}: ours {rows[name]['ours']}, paper {rows[name]['paper']}" for name in lost]


@pytest.mark.parametrize("paper", sorted(REPRODUCED))
def test_reproduce_json_marks_every_row_reproduced_or_not_with_a_reason(
    paper: str, quick_json: dict[str, dict]
) -> None:
    """Oracle: the issue's contract: every row has "reproduced": true|false and a "why" sentence,
    ours and the paper's side by side."""
    result = quick_json[paper]
    assert result["paper"] == paper and result["settings"]
    for row in result["rows"]:
        assert isinstance(row["reproduced"], bool)
        assert row["why"].startswith(("rule", "ranges", "our")) and len(row["why"]) > 40
        assert row["ours"] and row["paper"]


def test_reproduce_prints_a_table_and_a_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Oracle: the Klotski ladder's four rungs appear with the paper's figures; the PNG is written."""
    picture = tmp_path / "klotski.png"
    code, out, _ = run_cli(["reproduce", "klotski", "--quick", "--plot", str(picture)], capsys)
    assert code == 0
    for figure in ("5.721 tok/s", "18.24 tok/s", "19.074 tok/s", "22.414 tok/s"):
        assert figure in out
    assert "why:" in out and "rows reproduced" in out
    assert picture.read_bytes()[:4] == b"\x89PNG"


def test_reproduce_rejects_an_unknown_paper(capsys: pytest.CaptureFixture[str]) -> None:
    """Oracle: argparse names the choices and exits non-zero."""
    with pytest.raises(SystemExit) as exit_info:
        main(["reproduce", "switch-transformer"])
    assert exit_info.value.code != 0
    assert "aurora" in capsys.readouterr().err
