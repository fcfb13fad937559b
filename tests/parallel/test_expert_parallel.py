"""The expert-parallel MoE block on real gloo process groups (torchrun on loopback) against the
single-process block, and the exchange's bookkeeping against brute force."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shunter.cli import main as cli_main
from shunter.parallel.exchange import rank_rounds, rows_per_round
from shunter.parallel.moe import rows_between_ranks, split_by_shares
from shunter.plan.document import load_plan
from shunter.plan.schedule import schedule_all_to_all
from shunter.plan.slots import ExpertSlots
from shunter.trace.synthetic import zipf_trace

EMULATED_4 = Path(__file__).resolve().parents[2] / "examples" / "cluster-emulated-4.toml"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(nproc: int, module: str, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    """`torchrun --nproc-per-node nproc -m module args`, without torchrun's agent process (2 s of
    CPU less per launch on two cores): each rank gets the variables torchrun gives it, and as
    torchrun does, once a rank fails the others are ended. stdout and stderr: every rank's, in rank
    order; status: the first failing rank's. (Real torchrun launches are tested by the training
    benchmark's `--local` runs and the killed-rank tests.)"""
    port = str(_free_port())
    with tempfile.TemporaryDirectory() as scratch:
        ranks, outputs = [], []
        for rank in range(nproc):
            env = {
                **os.environ, "OMP_NUM_THREADS": "1", "RANK": str(rank), "LOCAL_RANK": str(rank),
                "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc), "GROUP_RANK": "0",
                "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
            }  # fmt: skip
            out, err = (open(Path(scratch) / f"{rank}.{kind}", "w+") for kind in ("out", "err"))  # noqa: SIM115
            outputs.append((out, err))
            ranks.append(
                subprocess.Popen([sys.executable, "-m", module, *args], stdout=out, stderr=err, env=env)
            )
        deadline, status = time.monotonic() + timeout, 0
        try:
            while any(r.poll() is None for r in ranks):
                status = status or next((r.returncode for r in ranks if r.returncode), 0)
                if status:
                    for r in ranks:  # as torchrun: a failed rank ends the group
                        if r.poll() is None:
                            r.terminate()
                if time.monotonic() > deadline:
                    raise subprocess.TimeoutExpired([module, *args], timeout)
                time.sleep(0.05)
        finally:
            for r in ranks:
                if r.poll() is None:
                    r.kill()
                r.wait()
        texts = []
        for out, err in outputs:
            out.seek(0), err.seek(0)
            texts.append((out.read(), err.read()))
            out.close(), err.close()
    status = status or next((r.returncode for r in ranks if r.returncode), 0)
    return subprocess.CompletedProcess(
        [module, *args], status, "".join(o for o, _ in texts), "".join(e for _, e in texts)
    )


# ---------------------------------------------------------------------------------------------
# bookkeeping (pure)


@settings(max_examples=60, deadline=None)
@given(
    st.integers(2, 5).flatmap(
        lambda n: st.tuples(
            st.just(n),
            st.lists(st.integers(0, 40), min_size=n * n, max_size=n * n),
            st.lists(st.sampled_from([1.0, 2.0, 0.5, 0.8]), min_size=n, max_size=n),
        )
    )
)
def test_rounds_move_every_row_exactly_once(case):
    n, flat, bandwidth = case
    rows = np.array(flat, dtype=np.int64).reshape(n, n)
    schedule = schedule_all_to_all(rows * 8192.0, np.array(bandwidth))
    moved = rows_per_round(schedule, rows)
    assert (moved >= 0).all()
    off = rows * (1 - np.eye(n, dtype=np.int64))
    np.testing.assert_array_equal(moved.sum(axis=0), off)
    for rank in range(n):
        plan = rank_rounds(rank, moved, rows)
        sent = np.zeros(int(rows[rank].sum()), dtype=int)
        received = np.zeros(int(rows[:, rank].sum()), dtype=int)
        for r, (sends, receives) in enumerate(zip(plan.sends, plan.receives, strict=True)):
            assert len({t.peer for t in sends}) == len(sends)  # one message per peer per round
            for t in sends:
                sent[t.start : t.stop] += 1
                assert moved[r, rank, t.peer] == t.stop - t.start
            for t in receives:
                received[t.start : t.stop] += 1
        # Every remote row leaves once and arrives once; local rows never travel.
        local_send = slice(int(rows[rank, :rank].sum()), int(rows[rank, : rank + 1].sum()))
        local_recv = slice(int(rows[:rank, rank].sum()), int(rows[: rank + 1, rank].sum()))
        assert (np.delete(sent, np.arange(sent.size)[local_send]) == 1).all()
        assert (sent[local_send] == 0).all()
        assert (np.delete(received, np.arange(received.size)[local_recv]) == 1).all()


@settings(max_examples=80, deadline=None)
@given(
    st.lists(st.integers(0, 30), min_size=3, max_size=3),
    st.lists(st.integers(1, 9), min_size=2, max_size=3),
)
def test_split_by_shares_is_largest_remainder_rounding(counts_of_ranks, weights):
    """Oracle: brute force over every way to split each rank's count among the replicas, keeping
    the ones whose parts are within 1 of count * share: the split sums exactly, lies within one row
    of its ideal, and gives the extra rows to the largest remainders."""
    share = np.array(weights, float) / sum(weights)
    slots = ExpertSlots(
        np.arange(len(share)) % 3, np.zeros(len(share), dtype=np.int64), share, num_experts=1, num_devices=3
    )
    counts = np.array(counts_of_ranks)[:, None]
    parts = split_by_shares(counts, slots)
    ideal = counts * share
    np.testing.assert_array_equal(parts.sum(axis=1), counts[:, 0])
    assert np.all(np.abs(parts - ideal) < 1)
    for rank in range(len(counts)):
        up = parts[rank] > np.floor(ideal[rank])
        remainder = ideal[rank] - np.floor(ideal[rank])
        if up.any() and (~up).any():
            assert remainder[up].min() >= remainder[~up].max() - 1e-12
    rows = rows_between_ranks(counts, slots)
    assert rows.sum() == counts.sum()


# ---------------------------------------------------------------------------------------------
# correctness on real process groups


@pytest.mark.parametrize(
    "nproc, tokens, placement",
    [
        (2, "9,4", None),
        (4, "7,0,13,2", None),  # uneven, and rank 1 has no tokens
        (4, "5,6,0,9", "0,0,0,0,0,0,0,3"),  # ranks 1 and 2 hold no experts and receive nothing
    ],
)
def test_builtin_model_matches_single_process(nproc, tokens, placement):
    args = ["--json", "--tokens", tokens] + (["--placement", placement] if placement else [])
    result = run_ranks(nproc, "shunter.parallel.check", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["ok"]
    for strategy in ("all_to_all", "scheduled", "random_order"):
        assert report[strategy]["max_abs_difference"] <= 1e-5
    rows = np.array(report["scheduled"]["rows_moved"])
    assert rows.shape == (nproc, nproc) and rows.sum() == 2 * sum(int(t) for t in tokens.split(","))
    if placement:
        assert rows[:, 1:3].sum() == 0


def test_a_replicated_plan_splits_a_replicated_experts_tokens_and_matches_single_process(tmp_path):
    """`shunter plan --replicate` on a skewed trace of the built-in model's shape replicates hot
    experts; the check runs that plan's slots: outputs equal the single-process block, and each
    replica of an expert gets its share of the expert's rows (within one row per sending rank)."""
    trace = zipf_trace(6, 4096, 8, 2, 1.5, 0.5, 0)
    trace.save(tmp_path / "skew.npz")
    plan_path = tmp_path / "plan.json"
    plan_args = ["--cluster", str(EMULATED_4), "--trace", str(tmp_path / "skew.npz"), "--replicate"]
    status = cli_main(["plan", *plan_args, "--no-baselines", "--out", str(plan_path)])
    assert status == 0
    slots = load_plan(plan_path).slots(0)
    assert not slots.is_exclusive
    result = run_ranks(
        4, "shunter.parallel.check", "--json", "--tokens", "31,0,40,25", "--plan", str(plan_path)
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["ok"]
    for strategy in ("all_to_all", "scheduled", "random_order"):
        assert report[strategy]["max_abs_difference"] <= 1e-5
    slot_rows = np.array(report["scheduled"]["slot_rows"])  # [n, S]
    for expert in np.flatnonzero(slots.replica_count > 1):
        columns = np.flatnonzero(slots.slot_expert == expert)
        total = slot_rows[:, columns].sum()
        assert total > 0
        expected = total * slots.slot_share[columns]
        assert np.all(np.abs(slot_rows[:, columns].sum(axis=0) - expected) <= 4)
        assert np.all(slot_rows[:, columns].sum(axis=0) > 0)


@pytest.mark.parametrize(
    "family",
    [
        "qwen2_moe",
        "deepseek_v3",
        "gpt_oss",
        "minimax_m2",
        "glm4_moe",
        "ernie4_5_moe",
        "llama4_text",
        "qwen3_next",
    ],
)
def test_families_with_shared_experts_and_group_routing(tiny_checkpoint, family):
    model = tiny_checkpoint(family)
    result = run_ranks(2, "shunter.parallel.check", str(model), "--json", "--tokens", "6,3")
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1])["ok"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "family", ["gpt_oss", "minimax_m2", "glm4_moe", "ernie4_5_moe", "llama4_text", "qwen3_next"]
)
def test_whole_model_greedy_tokens_on_two_ranks_equal_single_process(tiny_checkpoint, family):
    """Oracle: single-process `generate` (checked against transformers in tests/model). Each rank
    generates 20 tokens from its own prompt with every MoE layer expert-parallel (the schedule's
    exchange); rank 0 compares them with single-process generation of the same prompts."""
    model = tiny_checkpoint(family)
    result = run_ranks(
        2, "shunter.parallel.check", str(model), "--generate", "20", "--tokens", "5,3", "--json"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["ok"] and report["tokens"] == report["reference"]
    assert all(len(tokens) == 20 for tokens in report["tokens"])


def test_not_launched_by_torchrun_is_one_clear_line():
    env = {
        k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    }
    result = subprocess.run(
        [sys.executable, "-m", "shunter.parallel.check"], capture_output=True, text=True, env=env, timeout=60
    )
    assert result.returncode == 2
    assert "launch with torchrun" in result.stderr and "Traceback" not in result.stderr


def test_the_links_groups_carry_the_collective_timeout():
    """torch gives a new group a 30-minute timeout of its own; a rank still connecting the links'
    groups when a peer died waited that long. They carry the --timeout of the default group."""
    script = (
        "import torch\n"
        "from shunter.parallel.exchange import open_links\n"
        "from shunter.parallel.runtime import init_from_environment, run_rank\n"
        "def main():\n"
        "    init_from_environment(42.0, backend='gloo')\n"
        "    links = open_links()\n"
        "    for group in (links.ascending, links.descending):\n"
        "        print(group._get_backend(torch.device('cpu')).options._timeout.total_seconds())\n"
        "    return 0\n"
        "raise SystemExit(run_rank(main))\n"
    )
    env = {
        **os.environ, "RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()), "OMP_NUM_THREADS": "1",
    }  # fmt: skip
    command = [sys.executable, "-c", script]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["42.0", "42.0"]


def test_a_rank_killed_mid_exchange_fails_the_others_fast(tmp_path):
    """Three ranks loop exchanges; rank 2 is SIGKILLed after the first layer. The other two exit
    with one clear line well within their 30 s timeout instead of hanging."""
    port = str(_free_port())
    procs = []
    for rank in range(3):
        env = {
            **os.environ, "RANK": str(rank), "WORLD_SIZE": "3", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port, "OMP_NUM_THREADS": "1",
        }  # fmt: skip
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "shunter.bench.a2a",
                    "--bandwidth",
                    "1GB/s",
                    "--tokens",
                    "4096",
                    "--layers",
                    "6",
                    "--reps",
                    "50",
                    "--probe-bytes",
                    "100000",
                    "--timeout",
                    "30",
                    "--out",
                    str(tmp_path / "never.json"),
                ],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    # Rank 0 reports each finished layer on stderr; kill rank 2 once the exchanges are running.
    first_line = procs[0].stderr.readline()
    assert first_line.startswith("layer "), first_line + procs[0].stderr.read()[-2000:]
    assert procs[2].poll() is None, procs[2].communicate()[1][-2000:]
    procs[2].send_signal(signal.SIGKILL)
    for proc in procs[:2]:  # a hang past the ranks' 30 s collective timeout fails communicate()
        _, stderr = proc.communicate(timeout=45)
        assert proc.returncode == 1, stderr[-2000:]
        assert "a collective failed" in stderr and "Traceback" not in stderr
    assert not (tmp_path / "never.json").exists()
