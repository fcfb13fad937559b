"""The built-in model shipped in the package: transformers reads it, and it routes for real."""

from __future__ import annotations

import pytest
import torch

from shunter.model import Batch, load_model
from shunter.model.loader import BUILTIN_ROOT, DEFAULT_MODEL, TRACE_FILE, builtin_models

pytestmark = pytest.mark.skipif(DEFAULT_MODEL not in builtin_models(), reason="built-in model not shipped")


def test_transformers_loads_the_shipped_checkpoint_with_the_same_logits():
    """Oracle: transformers' Mixtral on the same files, both computing in fp32 from the bf16 weights."""
    from transformers import AutoModelForCausalLM

    path = BUILTIN_ROOT / DEFAULT_MODEL
    loaded = load_model(DEFAULT_MODEL, dtype="float32")
    ids = loaded.tokenizer.encode("def fibonacci(n):\n    if n < 2:\n        return n\n")
    tokens = torch.tensor([ids])
    ours = loaded.model.forward(
        Batch(tokens, torch.arange(len(ids))[None], torch.ones(1, len(ids), dtype=bool), 0)
    )
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = reference(input_ids=tokens).logits
    assert (ours - expected).abs().max().item() <= 1e-4


def test_the_shipped_checkpoint_fits_its_size_limit():
    assert (BUILTIN_ROOT / DEFAULT_MODEL / "model.safetensors").stat().st_size <= 25 * 10**6


def test_the_shipped_trace_is_skewed_and_correlated_beyond_chance():
    """Oracle: the same trace shuffled per layer (keeps popularity, breaks layer-to-layer links)."""
    from shunter.trace import load_skew, load_trace, transition_mutual_information

    trace = load_trace(BUILTIN_ROOT / DEFAULT_MODEL / TRACE_FILE)
    assert trace.num_experts == load_model(DEFAULT_MODEL).spec.num_experts
    assert (load_skew(trace) > 1.5).all()
    information = transition_mutual_information(trace)
    control = transition_mutual_information(trace, shuffle_seed=0)
    assert (information > 5 * control).all()
