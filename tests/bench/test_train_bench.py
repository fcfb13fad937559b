"""`shunter bench train`: bad input is one line; a tiny run on loopback ranks (torchrun, unshaped)
reports every variant's measured step and breakdown (full Lina's too: the all-to-all in chunks)
beside the simulator and the paper."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import numpy as np
import pytest

from shunter.bench.train import predict
from shunter.cli import main
from shunter.parallel.cluster import PREFIX, _base36
from tests.parallel.test_expert_parallel import _free_port
from tests.train.test_parallel import CONFIG
from tests.train.test_train import corpus  # noqa: F401  (a fixture)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--hosts", "1"], "at least 2 hosts"),
        (["--micro-op-bytes", "0"], "--micro-op-bytes: must be a positive number of bytes, got 0"),
        (["--bandwidth", "1Gbit/s,2Gbit/s", "--hosts", "2"], "give one rate"),
    ],
)
def test_bad_input_is_one_line(capsys, argv, message):
    assert main(["bench", "train", "--local", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_a_tiny_local_run_reports_every_variant(corpus, tmp_path, capsys):  # noqa: F811
    config = tmp_path / "model.toml"
    config.write_text(
        "\n".join(
            f"{k} = {json.dumps(v)}"
            for k, v in vars(CONFIG).items()
            if k not in ("steps", "checkpoint_every")
        )
        + "\n"
    )
    argv = ["bench", "train", "--local", "--hosts", "2", "--steps", "2", "--warmup", "1"]
    argv += ["--config", str(config), "--corpus", str(corpus), "--micro-op-bytes", "4KB"]
    argv += ["--port", str(_free_port()), "--json", "--out", str(tmp_path / "report.json")]
    argv += ["--plot", str(tmp_path / "timeline.png")]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report == json.loads((tmp_path / "report.json").read_text())
    assert [row["variant"] for row in report["rows"]] == [
        "overlap",
        "priority",
        "priority+partitioning",
        "lina",
    ]
    for name in ("overlap", "priority", "priority+partitioning", "lina"):
        measured = report["measured"][name]
        assert measured["steps"] == 2 and measured["step_s"] > 0 and measured["a2a_backward_s"] > 0
        assert report["predicted"][name]["step_s"] > 0
    assert report["rows"][0]["measured_speedup"] == 1.0
    assert (tmp_path / "timeline.png").stat().st_size > 0
    assert report["rows"][3]["measured_step_s"] > 0
    assert "lina+packing" not in report["measured"]  # two hosts cannot be halved into groups of two
    assert report["cores"] == len(os.sched_getaffinity(0))
    assert 0 < report["message_latency_s"] < 1.0  # measured on the same ranks (bench.latency)


def _predict(cores: float | None, routing: list[np.ndarray] | None) -> dict[str, dict[str, float]]:
    return predict(CONFIG, 4, 50e6, compute_s=0.4, micro_op_bytes=1 << 20, routing=routing, optimizer_s=0.05,
                   cores=cores)  # fmt: skip


def test_on_balanced_routing_calibrated_shared_cores_change_no_prediction():
    """Oracle: the prediction without sharing (cores=None). Under the ideal gate every rank computes
    the same ops at the same times, so sharing stretches them all alike, and the calibration to the
    measured (shared) compute and optimizer times undoes it."""
    alone = _predict(None, None)
    shared = _predict(2, None)
    for name in ("overlap", "priority", "priority+partitioning", "lina"):
        assert shared[name]["step_s"] == pytest.approx(alone[name]["step_s"], rel=1e-3)


def test_with_a_hot_rank_shared_cores_shorten_the_step():
    """Oracle: cores=None. One rank receives every row of a block: while it computes alone it runs
    at full speed, which the same measured mean compute, shared, makes a shorter step."""
    hot = np.zeros((CONFIG.num_layers, 4, 4))
    hot[:, :, 0] = CONFIG.batch_size // 4 * CONFIG.seq_len * CONFIG.top_k  # every rank sends rank 0 all
    alone = _predict(None, [hot])
    shared = _predict(2, [hot])
    assert shared["overlap"]["step_s"] < alone["overlap"]["step_s"]
    assert _predict(4, [hot])["overlap"]["step_s"] == pytest.approx(alone["overlap"]["step_s"], rel=1e-3)


needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("tc") is None,
    reason="the emulated cluster needs root, ip and tc",
)


@needs_root
def test_a_tiny_run_on_the_emulated_cluster_leaves_no_namespace(corpus, tmp_path, capsys):  # noqa: F811
    before = _namespaces()
    config = tmp_path / "model.toml"
    config.write_text(
        "\n".join(
            f"{k} = {json.dumps(v)}"
            for k, v in vars(CONFIG).items()
            if k not in ("steps", "checkpoint_every")
        )
        + "\n"
    )
    argv = ["bench", "train", "--hosts", "2", "--bandwidth", "200Mbit/s", "--steps", "1", "--warmup", "1"]
    argv += ["--config", str(config), "--corpus", str(corpus), "--micro-op-bytes", "16KB", "--json"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["emulated"] and all(report["measured"][n]["step_s"] > 0 for n in report["measured"])
    # Other runs on this machine may add namespaces meanwhile; ours carry this process's id.
    mine = f"{PREFIX}{_base36(os.getpid(), 5)}"
    assert not {name for name in _namespaces() - before if name.startswith(mine)}


def _namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def test_a_packed_runs_group_routing_is_assembled_and_predicted_as_lina_with_packing(tmp_path):
    """Four ranks in two expert-parallel groups of two record their group's rows [L, 2, 2]; the
    summary places them on the diagonal of [L, 4, 4] (oracle: the records written), and the packed
    run gets a prediction of its own (the simulator's packing: tests/sim/test_lina.py)."""
    from shunter.bench.train import summarize

    L = CONFIG.num_layers
    group_rows = {0: [[5, 7], [6, 4]], 2: [[3, 9], [8, 2]]}
    for rank in range(4):
        records = []
        for step in range(3):
            record = {
                name: 0.01 for name in ("step_s", "forward_compute_s", "backward_compute_s", "optimizer_s")
            }
            record |= {"a2a_forward_s": 0.0, "a2a_backward_s": 0.0, "allreduce_s": 0.0}
            record |= {"allreduce_exposed_s": 0.0, "a2a_with_allreduce_s": 0.0, "expert_allreduce_s": 0.0}
            record |= {"step": step, "rank": rank, "expert_parallel": 2}
            record["dispatch_rows"] = [group_rows[rank - rank % 2]] * L
            records.append(json.dumps(record))
        (tmp_path / f"steps.rank{rank}.jsonl").write_text("\n".join(records) + "\n")
    summary = summarize(tmp_path, 4, warmup=1)
    rows = np.asarray(summary["dispatch_rows"])
    assert rows.shape == (2, L, 4, 4) and summary["expert_parallel"] == [2, 2]
    assert (rows[:, :, :2, :2] == group_rows[0]).all() and (rows[:, :, 2:, 2:] == group_rows[2]).all()
    assert rows[:, :, :2, 2:].sum() == 0 and rows[:, :, 2:, :2].sum() == 0
    predicted = predict(CONFIG, 4, 50e6, compute_s=0.4, micro_op_bytes=1 << 20, packed=(2, list(rows)))
    assert predicted["lina+packing"]["step_s"] > 0
