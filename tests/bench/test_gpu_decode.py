"""The GPU decode benchmark's pure parts: llama.cpp's tensor split under a GPU budget (against
brute force), its -ot argument (against Python's regex, which agrees with std::regex on these),
and the medians."""

from __future__ import annotations

import itertools
import re

import pytest

from shunter.bench.gpu_decode import llama_cpu_tensors, override_argument, summarize

LAYERS = 3
TENSORS = [("token_embd.weight", 500), ("output.weight", 300), ("output_norm.weight", 4)] + [
    item
    for layer in range(LAYERS)
    for item in [
        (f"blk.{layer}.attn_q.weight", 40),
        (f"blk.{layer}.ffn_gate_exps.weight", 100),
        (f"blk.{layer}.ffn_up_exps.weight", 100),
        (f"blk.{layer}.ffn_down_exps.weight", 100),
    ]
]
EXPERTS = [name for name, _ in TENSORS if "_exps" in name]  # in layer order, gate/up/down


@pytest.mark.parametrize("budget", range(474, 1400, 37))
def test_the_longest_prefix_of_expert_tensors_that_fits_goes_to_the_gpu(budget):
    reserve = 50
    dense = sum(size for name, size in TENSORS if "_exps" not in name and name != "token_embd.weight")
    on_cpu = llama_cpu_tensors(TENSORS, budget, reserve)
    on_gpu = [name for name in EXPERTS if name not in on_cpu]
    # brute force: the longest prefix of the expert tensors, in layer order, within the budget
    best = max((k for k in range(len(EXPERTS) + 1) if dense + reserve + 100 * k <= budget), default=None)
    assert on_gpu == EXPERTS[:best]
    assert on_cpu == EXPERTS[best:]


def test_a_budget_below_the_dense_tensors_is_refused():
    with pytest.raises(ValueError, match="exceed"):
        llama_cpu_tensors(TENSORS, 400, 100)


def test_the_override_matches_exactly_the_tensors_kept_on_the_cpu():
    on_cpu = EXPERTS[4:]
    flag, value = override_argument(on_cpu)
    pattern, buffer = value.rsplit("=", 1)
    assert flag == "-ot" and buffer == "CPU" and "," not in pattern  # commas separate overrides
    matched = [name for name, _ in TENSORS if re.search(pattern, name)]
    assert matched == on_cpu
    assert override_argument([]) == []


def test_medians_skip_the_warm_up_rounds_and_pair_the_contenders():
    runs = []
    for round_, (ours, theirs) in enumerate([(1.0, 100.0), (10.0, 5.0), (30.0, 6.0), (20.0, 4.0)]):
        for contender, rate in (("shunter", ours), ("llama.cpp", theirs)):
            runs.append({"round": round_, "precision": "bf16", "condition": "budget", "contender": contender,
                         "decode_tok_s": {"8": rate}})  # fmt: skip
    runs.append({"round": 3, "precision": "bf16", "condition": "budget", "contender": "llama.cpp",
                 "error": "stopped"})  # fmt: skip
    (row,) = summarize(runs, warmup=1)
    assert row["shunter"] == {"median": 20.0, "min": 10.0, "max": 30.0, "runs": 3}
    assert row["llama.cpp"]["median"] == 5.0
    assert row["ratio"] == pytest.approx(4.0)
    assert list(itertools.chain(summarize(runs, warmup=4))) == []
