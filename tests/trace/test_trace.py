"""RoutingTrace file format, statistics on hand-computed cases, and `shunter trace`."""

from __future__ import annotations

import numpy as np
import pytest

from shunter.cli import main
from shunter.errors import ShunterError
from shunter.trace import (
    RoutingTrace,
    expert_load,
    load_skew,
    load_trace,
    popularity,
    successor_hit_rate,
    transition_counts,
)


def _trace(ids, num_experts=4):
    ids = np.asarray(ids)
    return RoutingTrace(
        ids, np.ones(ids.shape, np.float32) / ids.shape[2], num_experts, np.arange(ids.shape[0])
    )


def test_save_and_load_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    trace = RoutingTrace(
        rng.integers(0, 8, (3, 50, 2)),
        rng.random((3, 50, 2)),
        8,
        [1, 2, 3],
        "m",
        "src",
        rng.integers(0, 100, 50),
    )
    trace.save(tmp_path / "t.npz")
    loaded = load_trace(tmp_path / "t.npz")
    assert np.array_equal(loaded.expert_ids, trace.expert_ids)
    assert np.allclose(loaded.gate_weights, trace.gate_weights)
    assert (loaded.num_experts, loaded.model, loaded.source) == (8, "m", "src")
    assert np.array_equal(loaded.layer_indices, [1, 2, 3])
    assert np.array_equal(loaded.token_ids, trace.token_ids)
    assert not [p for p in tmp_path.iterdir() if p.name != "t.npz"]  # no temporary left behind


def test_load_counts_and_skew_by_hand():
    # layer 0: expert 0 chosen 3 times, 1 twice, 2 twice, 3 once; layer 1: expert 3 never chosen
    trace = _trace([[[0, 1], [0, 2], [0, 1], [2, 3]], [[1, 0], [1, 0], [2, 1], [0, 2]]])
    assert expert_load(trace).tolist() == [[3, 2, 2, 1], [3, 3, 2, 0]]
    assert load_skew(trace).tolist() == [3.0, float("inf")]
    assert np.allclose(popularity(trace).sum(axis=1), 1.0)


def test_transition_counts_pair_every_choice_with_every_next_choice():
    trace = _trace([[[0, 1]], [[2, 3]]])
    counts = transition_counts(trace)
    assert counts.shape == (1, 4, 4)
    expected = np.zeros((4, 4), int)
    expected[0, 2] = expected[0, 3] = expected[1, 2] = expected[1, 3] = 1
    assert np.array_equal(counts[0], expected)


def test_expert_id_out_of_range_is_rejected(tmp_path):
    with pytest.raises(ShunterError, match=r"expert_ids must lie in \[0, 4\)"):
        _trace([[[0, 4]]])


def test_trace_file_missing_a_field_names_it(tmp_path):
    np.savez(tmp_path / "t.npz", expert_ids=np.zeros((1, 2, 2), np.int32), num_experts=4)
    with pytest.raises(ShunterError, match="'gate_weights' is missing"):
        load_trace(tmp_path / "t.npz")


def test_not_a_trace_file(tmp_path):
    (tmp_path / "t.npz").write_text("hello")
    with pytest.raises(ShunterError, match="not a routing trace"):
        load_trace(tmp_path / "t.npz")


def test_trace_command_records_every_token_of_the_text(tiny_checkpoint, tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    model_dir = tmp_path / "model"
    import shutil

    shutil.copytree(tiny_checkpoint("olmoe"), model_dir)
    text = "def add(a, b):\n    return a + b\n" * 20
    tokenizer = Tokenizer(models.BPE(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel()
    tokenizer.train_from_iterator([text], trainers.BpeTrainer(vocab_size=96, special_tokens=["[UNK]"]))
    tokenizer.save(str(model_dir / "tokenizer.json"))
    (tmp_path / "text.txt").write_text(text)

    out = tmp_path / "trace.npz"
    status = main(
        ["trace", str(model_dir), "--text", str(tmp_path / "text.txt"), "--out", str(out), "--window", "64"]
    )
    assert status == 0
    trace = load_trace(out)
    num_tokens = len(tokenizer.encode(text).ids)
    assert trace.expert_ids.shape == (3, num_tokens, 2)
    assert trace.num_experts == 8
    assert np.array_equal(trace.token_ids, tokenizer.encode(text).ids)
    assert "max/min expert load per layer" in capsys.readouterr().out


def test_trace_command_missing_text_file_exits_nonzero(tiny_checkpoint, tmp_path, capsys):
    status = main(
        ["trace", str(tiny_checkpoint("olmoe")), "--text", str(tmp_path / "no.txt"), "--out", "x.npz"]
    )
    assert status == 2
    assert "no.txt: text file not found" in capsys.readouterr().err


def test_successor_hit_rate_is_one_for_deterministic_routing_and_chance_when_shuffled():
    """Oracle: closed form. Layer 1 repeats layer 0's expert (+1 mod 8): successors are exact."""
    rng = np.random.default_rng(0)
    first = rng.integers(0, 8, (4000, 1))
    trace = _trace(np.stack([first, (first + 1) % 8]), num_experts=8)
    assert successor_hit_rate(trace)[0] == 1.0
    shuffled = successor_hit_rate(trace, shuffle_seed=1)[0]
    assert abs(shuffled - 1 / 8) < 0.03  # one successor out of 8 uniform experts


def test_mutual_information_is_log2_experts_for_a_bijection_and_near_zero_when_shuffled():
    """Oracle: closed form. A bijection between layers over 8 uniform experts carries 3 bits."""
    from shunter.trace import transition_mutual_information

    first = np.random.default_rng(0).integers(0, 8, (8000, 1))
    trace = _trace(np.stack([first, (first + 3) % 8]), num_experts=8)
    assert abs(transition_mutual_information(trace)[0] - 3.0) < 0.01
    assert transition_mutual_information(trace, shuffle_seed=2)[0] < 0.01


def test_stats_command_reports_every_layer(tmp_path, capsys):
    import json

    from shunter.trace.synthetic import zipf_trace

    zipf_trace(3, 1000, 8, 2, 1.2, 0.5, 0).save(tmp_path / "t.npz")
    assert main(["stats", str(tmp_path / "t.npz"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [row["layer"] for row in report["layers"]] == [0, 1, 2]
    assert (
        report["layers"][0]["mutual_information_bits"]
        > report["layers"][0]["shuffled_mutual_information_bits"]
    )
