"""Shunter's runtime against transformers' own implementation, for every supported family.

Oracle: transformers (the reference implementation of each family) on the same checkpoint.
"""

from __future__ import annotations

import pytest
import torch

from shunter.model import Batch, generate, load_model
from shunter.model.generate import left_pad
from shunter.trace import RoutingRecorder
from tests.tiny_models import FAMILIES

LAYOUTS = ["per_expert", "fused"]
PROMPTS = [[3, 5, 7, 9, 11, 13, 15], [2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24]]


def _padded_inputs():
    tokens, pads = left_pad(PROMPTS)
    P = tokens.shape[1]
    valid = torch.arange(P)[None, :] >= pads[:, None]
    positions = (torch.arange(P)[None, :] - pads[:, None]).clamp(min=0)
    return tokens, valid, positions


def _reference(path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path).eval()
    model.generation_config.eos_token_id = None  # generate exactly max_new_tokens, as we do below
    return model


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_of_two_prompts_of_different_lengths_match_transformers(tiny_checkpoint, family, layout):
    path = tiny_checkpoint(family, fused=layout == "fused")
    tokens, valid, positions = _padded_inputs()
    with torch.no_grad():
        expected = _reference(path)(
            input_ids=tokens, attention_mask=valid.long(), position_ids=positions
        ).logits
    actual = load_model(path).model.forward(Batch(tokens, positions, valid, 0))
    assert (actual - expected)[valid].abs().max().item() <= 1e-4


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_twenty_greedy_tokens_match_transformers_generate(tiny_checkpoint, family, layout):
    path = tiny_checkpoint(family, fused=layout == "fused")
    tokens, valid, _ = _padded_inputs()
    with torch.no_grad():
        out = _reference(path).generate(
            input_ids=tokens, attention_mask=valid.long(), max_new_tokens=20, do_sample=False, pad_token_id=0
        )
    expected = out[:, tokens.shape[1] :].tolist()
    actual = generate(load_model(path).model, PROMPTS, max_new_tokens=20).tokens
    assert actual == expected


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_recorded_expert_choices_equal_reference_router_top_k(tiny_checkpoint, family, layout):
    path = tiny_checkpoint(family, fused=layout == "fused")
    reference = _reference(path)
    chosen: list[torch.Tensor] = []
    hooks = [
        module.register_forward_hook(lambda _m, _i, out: chosen.append(out[2].detach().clone()))
        for module in reference.modules()
        if type(module).__name__.lower().endswith("topkrouter")
    ]
    top_k = reference.config.num_experts_per_tok
    hooks += [  # Llama 4's router returns (scores, logits) and picks the top-k logits
        module.register_forward_hook(lambda _m, _i, out: chosen.append(out[1].topk(top_k).indices))
        for module in reference.modules()
        if type(module).__name__ == "Llama4Router"
    ]
    tokens, valid, positions = _padded_inputs()
    with torch.no_grad():
        reference(input_ids=tokens, attention_mask=valid.long(), position_ids=positions)
    for hook in hooks:
        hook.remove()

    loaded = load_model(path)
    moe_layers = [i for i, moe in enumerate(loaded.spec.moe_layers) if moe]
    recorder = RoutingRecorder(moe_layers, loaded.spec.num_experts)
    loaded.model.forward(Batch(tokens, positions, valid, 0), recorder=recorder)
    trace = recorder.trace()

    assert len(chosen) == len(moe_layers) == trace.num_layers
    keep = valid.reshape(-1)
    for layer, reference_ids in enumerate(chosen):
        expected = reference_ids[keep].sort(dim=-1).values
        actual = torch.from_numpy(trace.expert_ids[layer]).long().sort(dim=-1).values
        assert torch.equal(actual, expected), f"MoE layer {moe_layers[layer]}"


SCALED_ROPE = [
    ("mixtral", {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}),
    (
        "llama4_text",  # Llama 4 Scout's scaling, with a context short enough that every band shows
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
            "rope_theta": 500000.0,
        },
    ),
    ("glm4_moe", {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0, "partial_rotary_factor": 0.5}),
    (
        "qwen3_moe",
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "rope_theta": 10000.0},
    ),
    (
        "deepseek_v3",
        {
            "rope_type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 64,
            "rope_theta": 10000.0,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
            "beta_fast": 32,
            "beta_slow": 1,
        },
    ),
    (
        "deepseek_v2",
        {
            "rope_type": "yarn",
            "factor": 8.0,
            "original_max_position_embeddings": 32,
            "rope_theta": 10000.0,
            "mscale": 0.707,
            "mscale_all_dim": 0.707,
        },
    ),
]


@pytest.mark.parametrize("family, rope", SCALED_ROPE, ids=[f"{f}-{r['rope_type']}" for f, r in SCALED_ROPE])
def test_scaled_rope_logits_match_transformers(tmp_path, family, rope):
    from tests.tiny_models import build_hf_model

    build_hf_model(family, rope_parameters=rope).save_pretrained(tmp_path)
    tokens, valid, positions = _padded_inputs()
    with torch.no_grad():
        expected = _reference(tmp_path)(
            input_ids=tokens, attention_mask=valid.long(), position_ids=positions
        ).logits
    loaded = load_model(tmp_path)
    assert loaded.spec.rope_type == rope["rope_type"]
    actual = loaded.model.forward(Batch(tokens, positions, valid, 0))
    assert (actual - expected)[valid].abs().max().item() <= 1e-4


def test_unsupported_rope_type_is_a_clear_error(tmp_path):
    import json

    from shunter.errors import ShunterError
    from tests.tiny_models import build_hf_model

    build_hf_model("mixtral").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "longrope", "rope_theta": 10000.0}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ShunterError, match="rope type 'longrope' is not supported; supported: default, linear, yarn, llama3"
    ):
        load_model(tmp_path)


@pytest.mark.parametrize("value", [True, 3, "yarn", [1, 2]])
def test_rope_parameters_that_are_not_an_object_are_one_clear_line(value):
    """Oracle: the config's own field; any family, no weights needed."""
    from shunter.errors import ShunterError
    from shunter.model.spec import spec_from_config
    from tests.tiny_models import hf_config

    config = hf_config("mixtral").to_dict()
    config["rope_parameters"] = value
    with pytest.raises(ShunterError, match="field 'rope_parameters' must be an object"):
        spec_from_config(config, source="config.json")
