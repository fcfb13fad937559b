"""Whole-model expert-parallel inference (`torchrun -m shunter generate`) against the oracle of
single-process `shunter generate` (itself checked against transformers in tests/model): greedy
tokens must be equal for exclusive, replicated and live-rebalanced placements."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from shunter.model.spec import load_spec
from shunter.trace.synthetic import zipf_trace
from tests.parallel.test_expert_parallel import _free_port, run_ranks

PROMPT = "5,9,2,7,11"


def _single_process(model: Path, *args: str) -> dict:
    result = subprocess.run(
        [sys.executable, "-m", "shunter", "generate", str(model), "--prompt-ids", PROMPT, "--json", *args],
        capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def _expert_parallel(nproc: int, model: Path, *args: str) -> dict:
    result = run_ranks(nproc, "shunter", "generate", str(model), "--prompt-ids", PROMPT, "--json", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def write_plan(path: Path, model: Path, slots_of_layer: list[tuple[list, list, list]], devices: int) -> Path:
    """A plan document (version 2) with the given slots (device, expert, share) for every MoE layer."""
    spec = load_spec(model)
    layers = sum(spec.moe_layers)
    document = {
        "version": 2,
        "mode": "replicated",
        "cluster": {"devices": [{"bandwidth_bytes_s": 1e9, "compute_flop_s": 1e12}] * devices},
        "options": {"bytes_per_token": 256.0, "flops_per_token": 1e5},
        "models": [{"name": model.name, "num_layers": layers, "num_experts": spec.num_experts, "top_k": 2}],
        "layers": [
            {"layer": i, "slots": [{"device": d, "expert": e, "share": s}]}
            for i, (d, e, s) in enumerate(
                slots_of_layer * layers if len(slots_of_layer) == 1 else slots_of_layer
            )
        ],
    }
    path.write_text(json.dumps(document))
    return path


def exclusive_scattered(num_experts: int, devices: int) -> tuple[list, list, list]:
    """Expert e on device 3e mod n (not contiguous blocks)."""
    return [(3 * e) % devices for e in range(num_experts)], list(range(num_experts)), [1.0] * num_experts


def replicated_everywhere(num_experts: int, devices: int) -> tuple[list, list, list]:
    """Expert 0 on every device (uneven shares), expert 1 on two, the rest one each."""
    device, expert, share = [], [], []
    weights = np.arange(1, devices + 1, dtype=float)
    for d in range(devices):
        device.append(d), expert.append(0), share.append(float(weights[d] / weights.sum()))
    device += [0, devices - 1]
    expert += [1, 1]
    share += [0.3, 0.7]
    for e in range(2, num_experts):
        device.append(e % devices), expert.append(e), share.append(1.0)
    return device, expert, share


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3", "olmoe"])
@pytest.mark.parametrize("nproc", [2, 4])
def test_greedy_tokens_equal_single_process_with_contiguous_placement(tiny_checkpoint, family, nproc):
    model = tiny_checkpoint(family)
    reference = _single_process(model, "--batch", "3", "--max-new-tokens", "12")
    parallel = _expert_parallel(nproc, model, "--batch", "3", "--max-new-tokens", "12")
    assert parallel["generated_ids"] == reference["generated_ids"]
    assert parallel["generated_tokens"] == reference["generated_tokens"]
    assert parallel["engine"] == "expert-parallel" and parallel["world_size"] == nproc
    assert sum(parallel["sequences_per_rank"]) == 3


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
@pytest.mark.parametrize("nproc", [2, 4])
@pytest.mark.parametrize("layout", [exclusive_scattered, replicated_everywhere])
def test_greedy_tokens_equal_single_process_under_a_plan(tiny_checkpoint, tmp_path, family, nproc, layout):
    model = tiny_checkpoint(family)
    plan = write_plan(tmp_path / "plan.json", model, [layout(load_spec(model).num_experts, nproc)], nproc)
    reference = _single_process(model, "--batch", "2", "--max-new-tokens", "10")
    parallel = _expert_parallel(nproc, model, "--batch", "2", "--max-new-tokens", "10", "--plan", str(plan))
    assert parallel["generated_ids"] == reference["generated_ids"]


@pytest.mark.parametrize("family", ["qwen2_moe", "olmoe"])
def test_live_balance_moves_experts_and_keeps_greedy_tokens(tiny_checkpoint, tmp_path, family):
    """Lina's re-planning with free moves (every improving re-plan taken, so experts really move
    between ranks mid-generation) and a path profile: each rank's own prompt, tokens equal to
    single-process generation of that prompt."""
    model = tiny_checkpoint(family)
    spec = load_spec(model)
    zipf_trace(sum(spec.moe_layers), 2048, spec.num_experts, 2, 1.2, 0.5, 0).save(tmp_path / "profile.npz")
    result = run_ranks(
        2, "shunter.parallel.check", str(model), "--generate", "12", "--tokens", "6,3", "--json",
        "--balance", "live", "--free-moves", "--trace", str(tmp_path / "profile.npz"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["ok"] and report["tokens"] == report["reference"]
    assert report["live"]["replans"] > 0 and report["live"]["experts_loaded"] > 0
    assert report["live"]["bytes_loaded"] > 0


def test_live_balance_copies_declined_experts_in_the_background_then_moves_for_free(
    tiny_checkpoint, tmp_path
):
    """Copies priced at 1 byte/s: every move that needs a copy is declined, so without background
    copies nothing would move. The declined candidates' experts are copied in behind the model;
    once resident, moves cost nothing and are adopted, and no copy ever blocks a layer."""
    model = tiny_checkpoint("olmoe")
    spec = load_spec(model)
    zipf_trace(sum(spec.moe_layers), 2048, spec.num_experts, 2, 1.2, 0.5, 0).save(tmp_path / "profile.npz")
    result = run_ranks(
        2, "shunter.parallel.check", str(model), "--generate", "24", "--tokens", "6,3", "--json",
        "--balance", "live", "--copy-rate", "1", "--trace", str(tmp_path / "profile.npz"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    live = report["live"]
    assert report["ok"] and report["tokens"] == report["reference"]
    assert live["declined_replans"] > 0 and live["experts_loaded_in_background"] > 0
    assert live["experts_loaded"] == live["experts_loaded_in_background"] and live["load_s"] == 0
    assert live["replans"] > 0, live


def test_live_balance_through_generate_equals_single_process(tiny_checkpoint):
    model = tiny_checkpoint("mixtral")
    reference = _single_process(model, "--batch", "4", "--max-new-tokens", "10")
    parallel = _expert_parallel(2, model, "--batch", "4", "--max-new-tokens", "10", "--balance", "live")
    assert parallel["generated_ids"] == reference["generated_ids"]
    assert parallel["balance"] == "live" and "replans" in parallel["live"]


def write_colocated_plan(path: Path, model_a: Path, model_b: Path, devices: int) -> Path:
    """Aurora's pairing by hand: model a's experts in contiguous blocks, model b's reversed."""
    spec_a, spec_b = load_spec(model_a), load_spec(model_b)
    layers = sum(spec_a.moe_layers)
    assert layers == sum(spec_b.moe_layers)
    device_a = [(e * devices) // spec_a.num_experts for e in range(spec_a.num_experts)]
    device_b = [(spec_b.num_experts - 1 - e) % devices for e in range(spec_b.num_experts)]
    models = [(model_a, spec_a, device_a), (model_b, spec_b, device_b)]
    document = {
        "version": 2,
        "mode": "colocated",
        "cluster": {"devices": [{"bandwidth_bytes_s": 1e9, "compute_flop_s": 1e12}] * devices},
        "options": {"bytes_per_token": 256.0, "flops_per_token": 1e5},
        "models": [
            {"name": m.name, "num_layers": layers, "num_experts": s.num_experts, "top_k": 2}
            for m, s, _ in models
        ],
        "layers": [
            {
                "layer": i,
                "slots": [
                    {"device": d, "expert": list(range(s.num_experts)), "share": [1.0] * s.num_experts}
                    for _, s, d in models
                ],
            }
            for i in range(layers)
        ],
    }
    path.write_text(json.dumps(document))
    return path


@pytest.mark.parametrize("nproc", [2, 4])
def test_two_colocated_models_each_equal_their_single_process_run(tiny_checkpoint, tmp_path, nproc):
    model_a, model_b = tiny_checkpoint("olmoe"), tiny_checkpoint("mixtral")
    plan = write_colocated_plan(tmp_path / "colocated.json", model_a, model_b, nproc)
    reference_a = _single_process(model_a, "--batch", "3", "--max-new-tokens", "12")
    reference_b = _single_process(model_b, "--batch", "3", "--max-new-tokens", "12")
    both = _expert_parallel(
        nproc,
        model_a,
        "--batch",
        "3",
        "--max-new-tokens",
        "12",
        "--plan",
        str(plan),
        "--colocate",
        str(model_b),
    )
    assert both["generated_ids"] == reference_a["generated_ids"]
    assert both["colocated_model"]["generated_ids"] == reference_b["generated_ids"]
    assert both["colocated_model"]["family"] == "mixtral"


def test_a_colocated_plan_without_the_second_model_is_one_clear_error(tiny_checkpoint, tmp_path):
    model = tiny_checkpoint("olmoe")
    plan = write_colocated_plan(tmp_path / "colocated.json", model, tiny_checkpoint("mixtral"), 2)
    result = run_ranks(2, "shunter", "generate", str(model), "--prompt-ids", PROMPT, "--plan", str(plan))
    _one_error_line(result, "--colocate")


# ---------------------------------------------------------------------------------------------
# bad input and faults: one clear line


def _one_error_line(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode != 0
    # torchrun's agent prints its own traceback when a worker fails; none may come from Shunter's code
    frames = [line for line in result.stderr.splitlines() if line.strip().startswith('File "')]
    assert not [f for f in frames if "/shunter/" in f and "/torch/" not in f], result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("shunter: error:")]
    assert lines, result.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_a_plan_for_more_devices_than_ranks_is_one_clear_error(tiny_checkpoint, tmp_path):
    model = tiny_checkpoint("mixtral")
    plan = write_plan(tmp_path / "plan.json", model, [exclusive_scattered(8, 4)], 4)
    result = run_ranks(2, "shunter", "generate", str(model), "--prompt-ids", PROMPT, "--plan", str(plan))
    _one_error_line(result, "4 devices", "2 ranks")


def test_a_plan_for_another_model_is_one_clear_error(tiny_checkpoint, tmp_path):
    model = tiny_checkpoint("mixtral")
    plan = write_plan(tmp_path / "plan.json", tiny_checkpoint("qwen2_moe"), [exclusive_scattered(8, 2)], 2)
    result = run_ranks(2, "shunter", "generate", str(model), "--prompt-ids", PROMPT, "--plan", str(plan))
    _one_error_line(result, str(plan), "MoE layers")


def test_a_plan_leaving_an_expert_nowhere_is_one_clear_error(tiny_checkpoint, tmp_path):
    model = tiny_checkpoint("mixtral")
    device, expert, share = exclusive_scattered(8, 2)
    del device[3], expert[3], share[3]
    plan = write_plan(tmp_path / "plan.json", model, [(device, expert, share)], 2)
    result = run_ranks(2, "shunter", "generate", str(model), "--prompt-ids", PROMPT, "--plan", str(plan))
    _one_error_line(result, "every expert", "needs at least one slot")


def test_a_plan_without_torchrun_is_one_clear_error(tiny_checkpoint, tmp_path):
    model = tiny_checkpoint("mixtral")
    plan = write_plan(tmp_path / "plan.json", model, [exclusive_scattered(8, 2)], 2)
    env = {
        k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    }
    result = subprocess.run(
        [sys.executable, "-m", "shunter", "generate", str(model), "--prompt-ids", PROMPT,
         "--plan", str(plan)],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    _one_error_line(result, "launch with torchrun")


def test_a_rank_killed_mid_generation_ends_every_rank_with_one_line(tiny_checkpoint):
    """Three ranks generate; rank 2 is SIGKILLed once rank 0 has started. Ranks 0 and 1 exit with
    one clear line within their 30 s collective timeout."""
    model = tiny_checkpoint("mixtral")
    port = str(_free_port())
    procs = []
    for rank in range(3):
        env = {
            **os.environ, "RANK": str(rank), "WORLD_SIZE": "3", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port, "OMP_NUM_THREADS": "1",
        }  # fmt: skip
        command = [
            sys.executable, "-m", "shunter", "generate", str(model), "--prompt-ids", PROMPT,
            "--max-new-tokens", "240", "--batch", "6", "--timeout", "30",
        ]  # fmt: skip
        procs.append(
            subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    assert procs[0].stdout.read(len("5 ")) == "5 ", procs[0].communicate()[1][-2000:]  # the prompt: started
    procs[2].send_signal(signal.SIGKILL)
    for proc in procs[:2]:  # the timeout only stops a hang; how fast is the collective timeout's business
        _, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 1, stderr[-2000:]
        assert "Traceback" not in stderr
        errors = [line for line in stderr.splitlines() if line.startswith("shunter: error:")]
        assert len(errors) == 1 and "a collective failed" in errors[0], stderr[-2000:]
