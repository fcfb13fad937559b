"""The offload planner: its n against a brute-force check of klotski.md §7, the profile cache, the CLI."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from shunter.cli import main
from shunter.errors import ShunterError
from shunter.model.spec import load_spec, spec_from_config
from shunter.offload import profile as machine_profiles
from shunter.offload.planner import expected_routing, explain, pipeline_times, plan_batches
from shunter.offload.profile import MachineProfile, machine_profile, profile_cache_path
from shunter.sim.klotski import bubble_free_sides
from tests.tiny_models import _COMMON, FAMILIES, FAMILY_CONFIGS

MAX_BATCHES = 48


def tiny_spec(family: str):
    """The tiny test models' spec, without building their weights."""
    return spec_from_config({"model_type": family, **_COMMON, **FAMILY_CONFIGS[family]})


def random_profile(rng: np.random.Generator, **overrides) -> MachineProfile:
    """Times spread over orders of magnitude, so n lands anywhere from 1 to past the search limit."""
    fields = dict(
        dtype=str(rng.choice(["float32", "bfloat16"])),
        threads=2,
        batch_size=1,
        attention_s_per_token=10 ** rng.uniform(-5.5, -3.5),
        attention_s_per_token_per_context_token=10 ** rng.uniform(-9, -7),
        gate_s_per_token=10 ** rng.uniform(-6, -4.5),
        expert_s_per_token=10 ** rng.uniform(-6.5, -4.5),
        expert_min_s=10 ** rng.uniform(-5.5, -4),
        read_bytes_s=10 ** rng.uniform(7.3, 9.3),
    )
    return MachineProfile(**(fields | overrides))


def brute_force_smallest_n(times_at, K: int, max_batches: int) -> int | None:
    """Oracle: try n = 1, 2, ... and check (4)-(7) of klotski.md §7 by direct arithmetic on the
    times at that n (times_at(n))."""
    for n in range(1, max_batches + 1):
        times = times_at(n)
        tokens = np.asarray(times.expert_tokens_per_batch, dtype=float)
        order = sorted(range(len(tokens)), key=lambda e: (-tokens[e], e))  # hottest first, ties to low ids
        hot = [e for e in order[:K] if tokens[e] > 0]
        cold = [e for e in order[K:] if tokens[e] > 0]

        def run_s(e: int, n: int = n, tokens=tokens, times=times) -> float:
            return max(n * tokens[e] * times.expert_compute_s_per_token, times.expert_min_compute_s)

        attention_and_gates = n * times.attention_compute_s + n * times.gate_compute_s
        hot_s = sum(run_s(e, n) for e in hot)
        cold_s = sum(run_s(e, n) for e in cold)
        G, E_io, A = times.gate_transfer_s, times.expert_transfer_s, times.attention_transfer_s
        holds = [
            n * times.attention_compute_s >= G,
            attention_and_gates >= G + K * E_io,
            attention_and_gates + hot_s >= G + (K + (1 if cold else 0)) * E_io,
            attention_and_gates + hot_s + cold_s >= G + (K + len(cold)) * E_io + A,
        ]
        if all(holds):
            return n
    return None


@pytest.mark.parametrize("family", FAMILIES)
def test_planned_n_is_the_smallest_that_meets_every_inequality(family):
    spec = tiny_spec(family)
    rng = np.random.default_rng(sum(map(ord, family)))
    seen_capped = seen_small = False
    for _ in range(40):
        profile = random_profile(rng)
        share = rng.dirichlet(np.full(spec.num_experts, 0.5)) if rng.random() < 0.7 else None
        batch_size, context = int(rng.integers(1, 5)), int(rng.integers(1, 300))
        plan = plan_batches(spec, profile, batch_size, context, share, MAX_BATCHES)

        def times_at(n, profile=profile, batch_size=batch_size, context=context, share=share):
            return pipeline_times(spec, profile, batch_size, context, share, num_batches=n)

        expected = brute_force_smallest_n(times_at, spec.top_k, MAX_BATCHES)
        if expected is None:
            assert (plan.num_batches, plan.bubble_free) == (MAX_BATCHES, False)
            seen_capped = True
        else:
            assert (plan.num_batches, plan.bubble_free) == (expected, True)
            seen_small |= expected < 8
        # the numbers `explain` shows agree with the verdict: all hold at n, one fails at n - 1
        at_n = bubble_free_sides(plan.times, plan.num_batches, spec.top_k)
        if plan.bubble_free:
            assert all(left >= right for left, right in at_n.values())
            if plan.num_batches > 1:
                before = bubble_free_sides(plan.times_before, plan.num_batches - 1, spec.top_k)
                assert not all(left >= right for left, right in before.values())
                binding_left, binding_right = before[plan.binding]
                assert binding_left < binding_right
        assert plan.predicted_tok_s == pytest.approx(plan.num_batches * batch_size / plan.predicted_step_s)
    assert seen_capped and seen_small  # the random inputs cover both ends


def test_expected_routing_touches_the_experts_that_many_tokens_reach():
    """Closed forms: 64 uniform experts, top-8: one token touches 8 of them (at least top-k);
    1000 tokens touch all 64 (1 - (7/8)^1000 ~ 1); every micro-batch keeps its tokens x top-k pairs;
    without num_batches it is the plain expectation."""
    share = np.full(64, 1 / 64)
    one = expected_routing(share, 1, 8, num_batches=1)
    assert np.count_nonzero(one) == 8 and one.sum() == pytest.approx(8)
    many = expected_routing(share, 4, 8, num_batches=250)
    assert np.count_nonzero(many) == 64 and many.sum() == pytest.approx(32)
    # 2 tokens: expected touched = 64 (1 - (7/8)^2) = 15 of the most popular (ties: lowest ids)
    skewed = np.linspace(2, 1, 64)
    two = expected_routing(skewed / skewed.sum(), 1, 8, num_batches=2)
    assert np.flatnonzero(two).tolist() == list(range(15))
    assert expected_routing(share, 3, 8, None) == pytest.approx(np.full(64, 3 * 8 / 64))


def test_pipeline_times_from_the_profile_and_the_spec():
    """Oracle: the sizes by hand for the tiny Mixtral (H 64, 4 heads of 16, 2 KV heads, I 96, E 8)."""
    spec = tiny_spec("mixtral")
    profile = random_profile(np.random.default_rng(0), dtype="float32", read_bytes_s=1e8)
    times = pipeline_times(spec, profile, batch_size=3, context_tokens=100)
    expert_bytes = 3 * 64 * 96 * 4
    block_bytes = (2 * 64 + 64 * (64 + 2 * 32) + 64 * 64 + 8 * 64) * 4  # norms, q k v o, router
    assert times.expert_transfer_s == pytest.approx(expert_bytes / 1e8)
    assert times.attention_transfer_s == pytest.approx(block_bytes / 1e8)
    assert times.gate_transfer_s == times.kv_load_s == times.kv_store_s == 0.0
    per_token = profile.attention_s_per_token + 100 * profile.attention_s_per_token_per_context_token
    assert times.attention_compute_s == pytest.approx(3 * per_token)
    np.testing.assert_allclose(times.expert_tokens_per_batch, np.full(8, 3 * 2 / 8))
    skewed = pipeline_times(spec, profile, 3, 100, expert_share=np.arange(8.0))
    np.testing.assert_allclose(skewed.expert_tokens_per_batch, 6 * np.arange(8.0) / 28)


def test_slower_disk_never_plans_fewer_batches():
    spec = tiny_spec("qwen2_moe")
    rng = np.random.default_rng(7)
    for _ in range(15):
        profile = random_profile(rng)
        share = rng.dirichlet(np.ones(spec.num_experts))
        planned = [
            plan_batches(
                spec, dataclasses.replace(profile, read_bytes_s=bandwidth), 1, 64, share, MAX_BATCHES
            ).num_batches
            for bandwidth in np.geomspace(1e10, 1e7, 10)
        ]
        assert planned == sorted(planned), planned


def test_explain_shows_both_sides_at_n_and_n_minus_1():
    spec = tiny_spec("mixtral")
    profile = random_profile(
        np.random.default_rng(1), dtype="float32", attention_s_per_token=1e-4, read_bytes_s=2e8
    )
    plan = plan_batches(spec, profile, 1, 10, None, MAX_BATCHES)
    assert 1 < plan.num_batches < MAX_BATCHES
    text = explain(plan, sequences_given=2)
    for key in "4567":
        assert f"({key})" in text
    assert f"n={plan.num_batches}:" in text and f"n={plan.num_batches - 1}:" in text
    assert f"({plan.binding}) binds" in text
    assert "FAILS" in text and "tok/s" in text and "MiB/s" in text
    assert f"{plan.num_batches} would be bubble free, 2 given" in text
    hopeless = plan_batches(spec, dataclasses.replace(profile, read_bytes_s=1.0), 1, 10, None, 4)
    assert (hopeless.num_batches, hopeless.bubble_free) == (4, False)
    assert "not bubble free" in explain(hopeless)


def test_profile_cache_round_trips_and_re_measures_a_corrupt_file(tiny_checkpoint, tmp_path, monkeypatch):
    import torch

    monkeypatch.setenv("SHUNTER_CACHE_DIR", str(tmp_path / "cache"))
    path = tiny_checkpoint("mixtral")
    spec = load_spec(path)
    measured = []

    def fake_measure(spec, model_dir, dtype, batch_size=1):
        measured.append(batch_size)
        return random_profile(np.random.default_rng(len(measured)), dtype="float32")

    monkeypatch.setattr(machine_profiles, "measure_profile", fake_measure)
    # the spot check sees a machine as fast as any profile here, so no cached profile looks busy
    monkeypatch.setattr(machine_profiles, "attention_now_s", lambda *args: 1.0)
    first = machine_profile(spec, path, torch.float32)
    cache_file = profile_cache_path(spec, path, torch.float32)
    assert cache_file.parent == tmp_path / "cache" and cache_file.is_file()
    assert machine_profile(spec, path, torch.float32) == first and len(measured) == 1
    assert machine_profile(spec, path, torch.float32, refresh=True) != first and len(measured) == 2
    for corrupt in ("{not json", json.dumps({"key": "other"}), ""):
        cache_file.write_text(corrupt)
        assert machine_profile(spec, path, torch.float32) is not None
    assert len(measured) == 5
    saved = json.loads(cache_file.read_text())
    saved["profile"]["read_bytes_s"] = -1.0  # valid JSON, impossible value
    cache_file.write_text(json.dumps(saved))
    machine_profile(spec, path, torch.float32)
    assert len(measured) == 6 and json.loads(cache_file.read_text())["profile"]["read_bytes_s"] > 0
    # another dtype or thread count is another machine as far as the profile goes
    assert profile_cache_path(spec, path, torch.bfloat16) != cache_file
    monkeypatch.setattr(torch, "get_num_threads", lambda: 97)
    assert profile_cache_path(spec, path, torch.float32) != cache_file


@pytest.mark.parametrize("family", ["deepseek_v3", "qwen2_moe", "llama4_text", "qwen3_next"])
def test_a_real_profile_is_sane(tiny_checkpoint, family):
    """MLA attention, shared experts and linear attention (qwen3_next's first MoE layer) go
    through the same runtime functions as Mixtral's."""
    import torch

    path = tiny_checkpoint(family)
    profile = machine_profiles.measure_profile(load_spec(path), path, torch.float32)
    assert profile.attention_s_per_token > 0 and profile.gate_s_per_token > 0
    assert profile.expert_min_s > 0 and profile.read_bytes_s > 1e5


def _generate(args: list[str], capsys) -> tuple[int, dict | None, str]:
    status = main(["generate", *args])
    captured = capsys.readouterr()
    return status, (json.loads(captured.out) if status == 0 else None), captured.err


def test_generate_batches_auto_explains_and_gives_the_in_memory_tokens(
    tiny_checkpoint, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("SHUNTER_CACHE_DIR", str(tmp_path))
    path = str(tiny_checkpoint("mixtral"))
    base = ["--prompt-ids", "1,2,3", "--max-new-tokens", "6", "--batch", "3", "--json"]
    _, in_memory, err = _generate([path, *base, "--batches", "auto"], capsys)
    assert in_memory["engine"] == "in-memory" and "planner is not used" in err
    status, streamed, err = _generate(
        [path, *base, "--memory", "1.9MB", "--batches", "auto", "--explain"], capsys
    )
    assert status == 0 and streamed["engine"] == "offload"
    assert streamed["generated_ids"] == in_memory["generated_ids"]
    plan = streamed["plan"]
    assert streamed["batches"] == min(plan["num_batches"], 3)
    assert set(plan["inequalities_at_n"]) == {"4", "5", "6", "7"}
    assert "Offload planner" in err and "(7) n (tc_A + tc_G)" in err and "tok/s" in err
    assert f"Sequences in flight: {plan['num_batches']} would be bubble free, 3 given" in err
    assert "--batches auto: running" in err and str(tmp_path) in err
    assert len(list(tmp_path.glob("offload-profile-*.json"))) == 1


@pytest.mark.parametrize("value", ["0", "abc", "-2"])
def test_bad_batches_is_one_clear_error(tiny_checkpoint, capsys, value):
    status, _, err = _generate(
        [str(tiny_checkpoint("mixtral")), "--prompt-ids", "1", "--batches", value], capsys
    )
    assert status == 2
    assert err.startswith("shunter: error: --batches:") and err.count("\n") == 1
    with pytest.raises(ShunterError, match="--batches"):
        from shunter.commands.generate import parse_batches

        parse_batches(value)


def test_a_profile_measured_while_the_machine_was_busy_is_an_outlier():
    """Oracle: the case seen here, attention cached at 44 ms/token where it takes 0.3-1 ms."""
    busy = random_profile(np.random.default_rng(0), attention_s_per_token=44e-3)
    assert machine_profiles.measured_while_busy(busy, 1e-3, context=32)
    calm = random_profile(
        np.random.default_rng(0), attention_s_per_token=1.1e-3, attention_s_per_token_per_context_token=0.0
    )
    assert not machine_profiles.measured_while_busy(calm, 1e-3, context=32)
    assert not machine_profiles.measured_while_busy(calm, 1.0, context=32)  # slower now: keep it


def test_a_cached_profile_from_a_busy_machine_is_measured_again(tiny_checkpoint, tmp_path, monkeypatch):
    """The real spot check on a tiny model (microseconds) against a cached 44 ms/token: re-measured."""
    import torch

    monkeypatch.setenv("SHUNTER_CACHE_DIR", str(tmp_path / "cache"))
    path = tiny_checkpoint("mixtral")
    spec = load_spec(path)
    measured = []

    def fake_measure(spec, model_dir, dtype, batch_size=1):
        measured.append(batch_size)
        return random_profile(np.random.default_rng(1), dtype="float32", attention_s_per_token=44e-3)

    monkeypatch.setattr(machine_profiles, "measure_profile", fake_measure)
    machine_profile(spec, path, torch.float32)
    machine_profile(spec, path, torch.float32)
    assert len(measured) == 2  # the cached 44 ms/token was not trusted
