"""`shunter bench ep`: bad input fails with one line before anything is created; the ranks' harness
on a tiny configuration (torchrun on loopback, no namespaces) reports every policy, the simulator's
prediction beside each it models, and the colocation run."""

from __future__ import annotations

import json

import pytest

from shunter.bench.ep import PHASES, plot_per_batch
from shunter.cli import main
from tests.parallel.test_expert_parallel import run_ranks


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--hosts", "1", "--bandwidth", "1Gbit/s"], "at least 2 hosts"),
        (["--hosts", "2", "--bandwidth", "1Gbit/s", "--batches", "0"], "--batches: must be at least 1"),
        (["--hosts", "2", "--bandwidth", "1Gbit/s,1Gbit/s,1Gbit/s"], "3 bandwidths for 2 hosts"),
        (["--hosts", "2", "--bandwidth", "1Gbit/s", "--batch-tokens", "100000"], "the run needs"),
        (["--hosts", "2", "--bandwidth", "1Gbit/s", "--trace", "/nonexistent.npz"], "trace file not found"),
        (["--hosts", "2", "--bandwidth", "1Gbit/s", "--plot", "timeline.bmp"], "--plot"),
    ],
)
def test_bad_input_is_one_line(capsys, argv, message):
    assert main(["bench", "ep", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_tiny_run_reports_every_policy_beside_the_simulator():
    result = run_ranks(
        2, "shunter.bench.ep", "--bandwidth", "1GB/s", "--layers", "2", "--batches", "2", "--warmup", "0",
        "--batch-tokens", "128", "--profile-tokens", "2048", "--hidden", "32", "--intermediate", "64",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert set(report["policies"]) == {"static", "eplb", "lina", "ideal"}
    for entry in report["policies"].values():
        assert len(entry["per_batch_s"]) == 2 and entry["measured"]["p95_s"] >= entry["measured"]["p50_s"] > 0
        assert entry["predicted"]["p50_s"] > 0 and len(entry["predicted_per_batch_s"]) == 2
        assert entry["predicted_with_bucket"]["p50_s"] > 0
    for entry in report["policies"].values():
        phases = entry["phase_s_mean_per_rank"]
        assert len(phases) == 2 and all(len(rank) == len(PHASES) for rank in phases)
    assert report["policies"]["lina"]["phase2_replanned_layers"] >= 0
    colocation = report["colocation"]
    assert colocation["colocated_s"] > 0 and colocation["alone_on_half_s"] > 0


def test_plot_is_drawn_from_a_recorded_report(tmp_path):
    def policy(measured, predicted):
        return {
            "measured": {"p50_s": sorted(measured)[1], "p95_s": max(measured)},
            "predicted": predicted and {"p50_s": sorted(predicted)[1], "p95_s": max(predicted)},
            "per_batch_s": measured,
            "predicted_per_batch_s": predicted,
        }

    report = {
        "hosts": 2,
        "bandwidth_bytes_s": [125e6, 50e6],
        "layers": 2,
        "batch_tokens": 128,
        "policies": {
            "static": policy([0.12, 0.14, 0.13], [0.13, 0.13, 0.14]),
            "eplb": policy([0.11, 0.12, 0.15], None),
        },
    }
    for name in ("timeline.png", "timeline.svg"):
        plot_per_batch(report, tmp_path / name)
    assert (tmp_path / "timeline.png").read_bytes().startswith(b"\x89PNG")
    assert "<svg" in (tmp_path / "timeline.svg").read_text()
