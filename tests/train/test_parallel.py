"""Expert-parallel training on real gloo process groups (torchrun on loopback) against its oracle,
single-process training of the same global batch; the communication schedulers; exact resume; a
killed rank; and bad input."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch

from shunter.cli import main
from shunter.parallel.moe import rows_between_ranks
from shunter.plan.slots import ExpertSlots
from shunter.trace.synthetic import zipf_trace
from shunter.train import Trainer
from shunter.train.comm import GradientSync, StepTimeline, bucket_ops, micro_ops
from shunter.train.expert_parallel import chunk_slot_counts
from shunter.train.packing import PackingRule, packing_bytes
from tests.parallel.test_expert_parallel import EMULATED_4, _free_port, run_ranks
from tests.train.test_train import TINY, corpus  # noqa: F401  (a fixture)

STEPS = 20
CONFIG = dataclasses.replace(TINY, steps=STEPS, checkpoint_every=5)
CONFIG_ARGS = [
    f"--{f.name.replace('_', '-')}={getattr(CONFIG, f.name)}"
    for f in dataclasses.fields(CONFIG)
    if not isinstance(getattr(CONFIG, f.name), bool)
] + ["--no-bf16-autocast", "--tie-word-embeddings"]


def _train_args(corpus_root: Path, out: Path, *extra: str, seed_work: bool = True) -> list[str]:
    """The command line of a run into out, its work directory seeded with the tokenizer and token
    streams of the single-process run (so that no launch trains a tokenizer again)."""
    work = out.with_name(out.name + ".work")
    if seed_work and _PREPARED and not work.exists():
        work.mkdir(parents=True)
        for name in ("tokenizer.json", "train-tokens.npy", "heldout-tokens.npy"):
            shutil.copy(_PREPARED[0] / name, work / name)
    return ["train", "--out", str(out), "--corpus", str(corpus_root), *CONFIG_ARGS, *extra]


_PREPARED: list[Path] = []  # the work directory of the single-process run, once it exists


def _losses(work: Path, rank: int = 0) -> list[float]:
    lines = (work / f"steps.rank{rank}.jsonl").read_text().splitlines()
    return [json.loads(line)["cross_entropy"] for line in lines]


@pytest.fixture(scope="module")
def single_process_losses(corpus, tmp_path_factory) -> list[float]:  # noqa: F811
    out = tmp_path_factory.mktemp("single") / "model"
    result = Trainer(CONFIG, corpus, out, log=lambda _: None).run()
    _PREPARED[:] = [out.with_name("model.work")]
    return [ce for _, ce, _ in result.losses]


@pytest.mark.parametrize("comm, a2a_chunks", [("overlap", 1), ("lina", 3)])
def test_two_ranks_train_like_one_process_on_the_global_batch(
    corpus,  # noqa: F811
    single_process_losses,
    tmp_path,
    comm,
    a2a_chunks,
):
    """Oracle: single-process training of the same global batch. Each rank trains on half of each
    batch and holds half of the experts; losses agree to 1e-5 relative over 20 steps, on both ranks.
    Micro-ops of 4 KB cut every matrix into several; Lina's run also cuts every all-to-all into 3
    chunks pipelined with the expert FFN."""
    out = tmp_path / "model"
    args = _train_args(corpus, out, "--expert-parallel", "2", "--comm", comm, "--micro-op-bytes", "4KB")
    args += ["--a2a-chunks", str(a2a_chunks)]
    result = run_ranks(2, "shunter", *args, "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    work = tmp_path / "model.work"
    for rank in (0, 1):
        losses = _losses(work, rank)
        assert len(losses) == STEPS
        for ours, reference in zip(losses, single_process_losses, strict=True):
            assert abs(ours - reference) <= 1e-5 * abs(reference)
    timing = json.loads((work / "steps.rank1.jsonl").read_text().splitlines()[-1])
    assert timing["comm"] == comm and timing["a2a_backward_s"] > 0 and timing["allreduce_s"] > 0
    summary = json.loads(result.stdout[result.stdout.index("{") :])
    assert summary["steps"] == STEPS and (out / "model.safetensors").is_file()


def test_packed_experts_train_like_one_process_and_resume_packed(
    corpus,  # noqa: F811
    single_process_losses,
    tmp_path,
):
    """Lina's expert packing on four ranks: one expert per rank until step 3, where Lina's rule
    (its threshold so high that it always packs; the priced rule would not, on this tiny batch)
    halves the expert-parallel ranks: two groups of two ranks then each hold all four experts,
    replicas summing their gradients, weights and AdamW state exchanged once. Stopped at step 7
    and resumed, the run continues packed. Oracle: single-process training of the same global
    batch."""
    packing = ["--expert-packing", "--packing-rule", "lina", "--packing-from-step", "3"]
    packing += ["--packing-every", "4", "--packing-threshold", "1e9"]
    args = _train_args(corpus, tmp_path / "model", "--expert-parallel", "4", "--comm", "lina", *packing)
    first = run_ranks(4, "shunter", *args, "--micro-op-bytes", "8KB", "--stop-after", "7")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "expert-parallel 4 -> 2 (2 experts per rank)" in first.stderr
    manifest = json.loads((tmp_path / "model.work" / "parallel.json").read_text())
    assert manifest["step"] == 7 and manifest["expert_parallel"] == 2
    resumed = run_ranks(4, "shunter", *args, "--micro-op-bytes", "8KB", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for rank in range(4):
        losses = _losses(tmp_path / "model.work", rank)
        assert losses == pytest.approx(single_process_losses, rel=1e-5)
    steps = [
        json.loads(line) for line in (tmp_path / "model.work" / "steps.rank3.jsonl").read_text().splitlines()
    ]
    assert [s["expert_parallel"] for s in steps] == [4] * 3 + [2] * (STEPS - 3)
    assert all(s["expert_allreduce_s"] > 0 for s in steps[3:])


def test_the_packing_rule_halves_while_the_ffn_is_the_shorter_micro_op():
    rule = PackingRule(from_step=10, every=4)
    assert [rule.due(step) for step in (9, 10, 12, 14, 18)] == [False, True, False, True, True]
    assert rule.packed(8, ffn_micro_op_s=0.01, a2a_micro_op_s=0.02) == 4
    assert rule.packed(8, ffn_micro_op_s=0.03, a2a_micro_op_s=0.02) == 8
    assert rule.packed(4, 0.01, 0.02) == 2 and rule.packed(2, 0.01, 0.02) == 2  # never below 2
    assert rule.packed(6, 0.01, 0.02) == 3 and rule.packed(3, 0.01, 0.02) == 3  # only even degrees
    assert (
        rule.packed(8, 0.01, 0.02, saved_bytes=5.0, added_bytes=6.0) == 8
    )  # priced: costs more than it saves
    assert rule.packed(8, 0.01, 0.02, saved_bytes=7.0, added_bytes=6.0) == 4
    lina = PackingRule(rule="lina")
    assert lina.packed(8, 0.01, 0.02, saved_bytes=5.0, added_bytes=6.0) == 4  # the paper's rule alone


@pytest.mark.parametrize("expert_parallel, world", [(4, 4), (8, 8), (4, 8)])
def test_packing_bytes_count_what_halving_moves_through_one_port(expert_parallel, world):
    """Oracle, brute force: a rank's rows spread evenly over the experts, each row leaving the rank
    when its expert's contiguous block is elsewhere, counted before and after halving; the replicas'
    ring allreduce from network.cost's flows, the bytes leaving rank 0's port."""
    from shunter.network.cost import ring_allreduce_flows
    from shunter.parallel.moe import contiguous_placement

    E, L, rows, row_bytes, expert_bytes = 16, 3, 1600, 1024, 10_000

    def leaving(P: int) -> int:
        device = contiguous_placement(E, P)
        return sum(rows // E for e in range(E) if device[e] != 0)  # rank 0, position 0 of its group

    def ring_out(P: int) -> float:
        src, _, nbytes = ring_allreduce_flows(L * E / P * expert_bytes, world // P)  # every layer's
        return float(nbytes[src == 0].sum())

    saved, added = packing_bytes(expert_parallel, world, L, rows, row_bytes, E, expert_bytes)
    assert saved == pytest.approx(
        4 * L * row_bytes * (leaving(expert_parallel) - leaving(expert_parallel // 2))
    )
    assert added == pytest.approx(ring_out(expert_parallel // 2) - ring_out(expert_parallel))


def test_parallel_resume_is_exact(corpus, single_process_losses, tmp_path):  # noqa: F811
    """Oracle: the same parallel run uninterrupted. Stopped after 7 steps (between checkpoints;
    the state is saved at the stop) and resumed under another scheduler, the losses are
    bit-identical: the schedulers only reorder the same sums."""
    straight = run_ranks(2, "shunter", *_train_args(corpus, tmp_path / "a", "--expert-parallel", "2"))
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert _losses(tmp_path / "a.work") == pytest.approx(single_process_losses, rel=1e-5)
    first = _train_args(corpus, tmp_path / "b", "--expert-parallel", "2", "--stop-after", "7")
    stopped = run_ranks(2, "shunter", *first)
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    assert json.loads((tmp_path / "b.work" / "parallel.json").read_text())["step"] == 7
    assert not (tmp_path / "b").exists()
    second = _train_args(corpus, tmp_path / "b", "--expert-parallel", "2", "--comm", "priority", "--resume")
    resumed = run_ranks(2, "shunter", *second)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _losses(tmp_path / "b.work") == _losses(tmp_path / "a.work")
    assert len(_losses(tmp_path / "b.work")) == STEPS


def test_a_killed_rank_ends_the_others_with_one_line_and_the_checkpoint_resumes(
    corpus,  # noqa: F811
    single_process_losses,
    tmp_path,
):
    """Rank 1 is SIGKILLed once a checkpoint exists; rank 0 exits with one clear line well within
    its 30 s collective timeout, and the last checkpoint resumes on two ranks."""
    port = str(_free_port())
    args = _train_args(corpus, tmp_path / "model", "--expert-parallel", "2", "--timeout", "30")
    args += ["--steps", "100000", "--checkpoint-every", "2"]
    procs = []
    for rank in range(2):
        env = {
            **os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": "1",
        }  # fmt: skip
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "shunter", *args],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    manifest = tmp_path / "model.work" / "parallel.json"
    deadline = time.monotonic() + 120
    while not manifest.is_file() and time.monotonic() < deadline and procs[0].poll() is None:
        time.sleep(0.1)
    assert manifest.is_file(), procs[0].communicate(timeout=30)[1][-2000:]
    time.sleep(0.3)  # mid-step, between checkpoints most of the time
    procs[1].send_signal(signal.SIGKILL)
    started = time.monotonic()
    _, stderr = procs[0].communicate(timeout=45)
    procs[1].communicate()
    assert time.monotonic() - started < 40
    assert procs[0].returncode == 1, stderr[-2000:]
    assert "a collective failed" in stderr and "Traceback" not in stderr
    saved = json.loads(manifest.read_text())["step"]
    resume = [*args, "--resume", "--stop-after", "1"]
    resumed = run_ranks(2, "shunter", *resume)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads(manifest.read_text())["step"] == saved + 1


def test_the_allreduce_ops_cover_every_gradient_element_once():
    params = [torch.zeros(10, 7), torch.zeros(3), torch.zeros(100)]
    for ops in (micro_ops(params, 40), bucket_ops(params, 200), bucket_ops(params, 1)):
        covered = [torch.zeros(p.numel(), dtype=torch.int64) for p in params]
        for op in ops:
            for segment in op:
                covered[segment.param][segment.start : segment.stop] += 1
        assert all((c == 1).all() for c in covered)
    assert all(len(op) == 1 and (op[0].stop - op[0].start) * 4 <= 40 for op in micro_ops(params, 40))


@pytest.mark.parametrize("priority", [False, True])
def test_the_gradient_sync_leaves_no_hook_behind_between_backwards(priority):
    """A hook left on a parameter holds the sync (and its process group) where the garbage
    collector cannot see it: the group then lives into the interpreter's teardown, where gloo can
    abort the process. Hooks are on during a backward only."""
    params = [torch.zeros(4, requires_grad=True), torch.zeros(3, requires_grad=True)]
    sync = GradientSync(params, bucket_ops(params, 1 << 20), priority, None, StepTimeline())
    for _ in range(2):
        sync.begin_backward()
        assert all(len(p._post_accumulate_grad_hooks or {}) == 1 for p in params)
        sync.stop()
        assert all(not p._post_accumulate_grad_hooks for p in params)
    alive = weakref.ref(sync)
    del sync
    assert alive() is None


@pytest.mark.parametrize("chunks", [1, 3, 7])
def test_dispatch_chunks_cut_each_block_into_nearly_equal_contiguous_parts(chunks):
    """Every chunk is a dispatch of its own: the chunks' slot counts sum to the layer's, each
    (source, destination) block is cut into parts differing by at most one row, and the parts,
    in chunk order, are the block's rows (sorted by slot) in order."""
    slots = ExpertSlots.from_device_of_expert([0, 0, 1, 2, 2, 2], 3)  # one slot per expert
    slot_counts = np.random.default_rng(chunks).integers(0, 6, size=(3, slots.num_slots))
    parts = chunk_slot_counts(slot_counts, slots, chunks)
    assert len(parts) == chunks and (sum(parts) == slot_counts).all()
    rows = np.stack([rows_between_ranks(part, slots) for part in parts])  # [K, n, n]
    assert (rows.max(axis=0) - rows.min(axis=0) <= 1).all()
    for source in range(3):
        for device in range(3):
            mine = np.flatnonzero(slots.slot_device == device)
            block = np.repeat(mine, slot_counts[source, mine])
            pieces = [np.repeat(mine, part[source, mine]) for part in parts]
            assert np.array_equal(np.concatenate(pieces), block)


@pytest.mark.parametrize("a2a_chunks", [1, 4])
def test_a_rank_whose_experts_no_token_chose_runs_the_same_backward(tmp_path, a2a_chunks):
    """A rank that receives no rows in a layer still runs that layer's backward all-to-all: without
    it its peers' next all-to-all met a different one on that rank (a gloo size mismatch, seen when
    training on the emulated cluster). Oracle: one process running both MoE layers on the whole
    batch; the unchosen experts' gradients are zero there. In 4 chunks (pipelined with the expert
    FFN) the same holds for every chunk, some of them empty on a rank."""
    from shunter.model.layers import moe_block
    from tests.train.unchosen_experts_ranks import TOKENS_PER_RANK, loss_of, setup

    result = run_ranks(2, "tests.train.unchosen_experts_ranks", str(tmp_path), str(a2a_chunks))
    assert result.returncode == 0, result.stderr[-3000:]
    spec, moes, x = setup()
    x.requires_grad_(True)
    for moe in moes:
        moe.experts_gate_up.requires_grad_(True)
        moe.experts_down.requires_grad_(True)
    hidden = moe_block(x, moes[0], spec).output
    chosen = moe_block(hidden.abs() + 0.1, moes[1], spec)
    assert set(chosen.expert_ids.flatten().tolist()) == {0, 1}  # rank 1's experts 2 and 3 unchosen
    loss_of(chosen.output, slice(None)).backward()
    for rank in (0, 1):
        grads = torch.load(tmp_path / f"grads.rank{rank}.pt")
        rows = slice(rank * TOKENS_PER_RANK, (rank + 1) * TOKENS_PER_RANK)
        assert_close_to_scale(grads["x"], x.grad[rows])
        for i, moe in enumerate(moes):
            ids = grads[f"layer{i}.experts"]
            for name, full in (("gate_up", moe.experts_gate_up), ("down", moe.experts_down)):
                ours = grads[f"layer{i}.{name}"]
                ours = torch.zeros_like(full[ids]) if ours is None else ours
                assert_close_to_scale(ours, full.grad[ids])


def assert_close_to_scale(ours: torch.Tensor, reference: torch.Tensor) -> None:
    """Equal up to float32 rounding of sums in another order: 1e-5 of the reference's largest value."""
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5 * float(reference.abs().max()) + 1e-12)


@pytest.fixture()
def four_device_plan(tmp_path) -> Path:
    trace = zipf_trace(CONFIG.num_layers, 512, CONFIG.num_experts, CONFIG.top_k, 1.2, 0.5, 0)
    trace.save(tmp_path / "trace.npz")
    plan = tmp_path / "plan.json"
    argv = ["plan", "--cluster", str(EMULATED_4), "--trace", str(tmp_path / "trace.npz")]
    assert main([*argv, "--no-baselines", "--out", str(plan)]) == 0
    return plan


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--micro-op-bytes", "0"], "--micro-op-bytes: must be a positive number of bytes, got 0"),
        (["--micro-op-bytes", "-5"], "--micro-op-bytes: size must not be negative"),
        (["--a2a-chunks", "0"], "--a2a-chunks: must be at least 1 (1: no chunking), got 0"),
        (["--expert-parallel", "8"], "--expert-parallel: 8 ranks for 4 experts"),
        (["--batch-size", "5"], "--batch-size: 5 sequences do not split evenly over 2 ranks"),
        (["--plan", "PLAN"], "the plan is for 4 devices, but --expert-parallel is 2"),
        (["--expert-packing"], "--expert-packing: --expert-parallel 2 cannot be halved"),
        (
            ["--expert-packing", "--packing-threshold", "nan"],
            "--packing-threshold: must be a positive finite",
        ),
        (["--expert-packing", "--packing-every", "0"], "--packing-every: must be at least 1, got 0"),
        (["--expert-packing", "--packing-rule", "x"], "--packing-rule: 'x' is not one of priced, lina"),
    ],
)
def test_bad_parallel_input_is_one_line(corpus, tmp_path, capsys, four_device_plan, extra, message):  # noqa: F811
    extra = [str(four_device_plan) if arg == "PLAN" else arg for arg in extra]
    capsys.readouterr()  # the plan's own output
    argv = _train_args(corpus, tmp_path / "model", "--expert-parallel", "2", *extra, seed_work=False)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "model.work").exists()


def test_a_parallel_flag_without_expert_parallel_is_one_line(corpus, tmp_path, capsys):  # noqa: F811
    argv = _train_args(corpus, tmp_path / "model", "--comm", "lina", seed_work=False)
    assert main(argv) == 2
    assert "--comm: only for expert-parallel training" in capsys.readouterr().err
    argv = _train_args(corpus, tmp_path / "model", "--expert-packing", seed_work=False)
    assert main(argv) == 2
    assert "--expert-packing: only for expert-parallel training" in capsys.readouterr().err


def test_a_parallel_run_not_launched_by_torchrun_is_one_clear_line(corpus, tmp_path):  # noqa: F811
    env = {
        k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    }
    argv = _train_args(corpus, tmp_path / "model", "--expert-parallel", "2")
    result = subprocess.run(
        [sys.executable, "-m", "shunter", *argv], capture_output=True, text=True, env=env, timeout=60
    )
    assert result.returncode == 2
    assert "launch with torchrun" in result.stderr and "Traceback" not in result.stderr
