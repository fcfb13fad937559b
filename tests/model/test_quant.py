"""Group-wise weight quantisation: the fast unpack against the element-by-element reference, the
checkpoint writer, and the quantised model against transformers running the dequantised weights."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from shunter.errors import ShunterError
from shunter.model import kernels, load_model
from shunter.model.checkpoint import Checkpoint
from shunter.model.executor import Batch
from shunter.model.quant import (
    QuantizedWeight,
    dequantize,
    dequantize_reference,
    quantize,
    quantized_linear_reference,
    quantized_tensor_names,
)
from shunter.model.quantize_checkpoint import quantize_checkpoint
from tests.tiny_models import build_hf_model, save_tiny

TOKENS = torch.tensor([[3, 17, 5, 60, 9, 41, 2, 88, 13, 7]])


def _weight(out_features=12, in_features=128, seed=0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(out_features, in_features, generator=generator)
    w[0, :32] += 3.0  # a skewed group: the 4-bit min must shift it
    w[1, 64:96] = 0.25  # a constant group: scale 0, every code exact
    return w


@pytest.mark.parametrize("bits", [4, 8])
def test_fast_dequantize_equals_the_element_by_element_reference(bits):
    q = quantize(_weight(), bits, 32)
    assert torch.equal(dequantize(q), dequantize_reference(q))


def test_each_8_bit_value_is_within_half_a_step_of_the_weight():
    w = _weight()
    q = quantize(w, 8, 32)
    step = q.scales.float().repeat_interleave(32, dim=-1)
    # half a step of rounding, plus the fp16 rounding of the scale
    assert ((dequantize_reference(q) - w).abs() <= step / 2 + 1e-3 * w.abs().amax()).all()


def test_4_bit_groups_fit_no_worse_than_min_max_rounding_and_better_on_gaussian_weights():
    """Oracle: plain min/max rounding (scale = (max - min) / 15, min = min, both fp16, codes rounded
    against them), written out here. The range search never reconstructs a group worse, and on
    Gaussian weights (whose extremes are rare outliers) it is better overall."""
    for w in (_weight(), torch.randn(64, 256, generator=torch.Generator().manual_seed(5))):
        groups = w.reshape(w.shape[0], -1, 32)
        low, high = groups.amin(-1), groups.amax(-1)
        scale = ((high - low) / 15).half().float()[..., None]
        mn = low.half().float()[..., None]
        codes = ((groups - mn) / torch.where(scale == 0, 1.0, scale)).round().clamp(0, 15)
        min_max_error = (codes * scale + mn - groups).square().sum(-1)
        fitted = dequantize_reference(quantize(w, 4, 32)).reshape(groups.shape)
        fitted_error = (fitted - groups).square().sum(-1)
        assert (fitted_error <= min_max_error * (1 + 1e-5) + 1e-12).all()
    assert fitted_error.sum() < 0.9 * min_max_error.sum()
    assert dequantize_reference(quantize(_weight(), 4, 32))[1, 64:96].eq(0.25).all()  # a constant group


@pytest.mark.parametrize("bits", [4, 8])
def test_packed_layout_and_bytes(bits):
    q = quantize(_weight(), bits, 64)
    assert q.shape == (12, 128)
    assert q.packed.dtype == (torch.int8 if bits == 8 else torch.uint8)
    assert q.packed.shape == (12, 128 if bits == 8 else 64)
    assert q.scales.shape == (12, 2) and q.scales.dtype == torch.float16
    assert (q.mins is None) == (bits == 8)
    # 8.25 and 4.5 bits a weight at group 64 (Q8_0 has 8.5, Q4_0 4.5, Q4_1 5, at group 32)
    assert q.nbytes * 8 / (12 * 128) == (8.25 if bits == 8 else 4.5)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_linear_equals_a_matmul_with_the_reference_weight(bits, dtype):
    q = quantize(_weight(), bits, 32)
    x = torch.randn(5, 128).to(dtype)
    bias = torch.randn(12).to(dtype)
    expected = F.linear(x.float(), dequantize_reference(q), bias.float())
    got = quantized_linear_reference(x, q, bias)  # the kernels' path: tests/model/test_kernels.py
    assert got.dtype == dtype
    torch.testing.assert_close(
        got.float(), expected, rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-2
    )


def test_stacked_weights_quantise_per_expert_rows():
    w = torch.randn(3, 8, 64)
    stacked = quantize(w, 4, 32)
    assert stacked.shape == (3, 8, 64)
    for e in range(3):
        assert torch.equal(dequantize(stacked[e]), dequantize(quantize(w[e], 4, 32)))


@pytest.mark.parametrize(
    ("bits", "group", "weight", "message"),
    [
        (3, 32, torch.zeros(4, 64), "bits must be 4 or 8"),
        (4, 48, torch.zeros(4, 64), "group size 48 does not divide the input dimension 64"),
        (8, 32, torch.tensor([[float("nan")] * 64]), "non-finite"),
        (4, 32, torch.tensor([[1e6] + [0.0] * 63]), "exceeds fp16"),
    ],
)
def test_bad_quantisation_input_is_one_clear_error_naming_the_tensor(bits, group, weight, message):
    with pytest.raises(ShunterError, match=message) as info:
        quantize(weight, bits, group, what="model.safetensors: tensor 'w1'")
    assert "tensor 'w1'" in str(info.value)


def test_quantised_names_follow_the_weight_names():
    assert quantized_tensor_names("a.w1.weight") == ("a.w1.qweight", "a.w1.scales", "a.w1.mins")
    assert quantized_tensor_names("a.experts.down_proj") == (
        "a.experts.down_proj.qweight",
        "a.experts.down_proj.scales",
        "a.experts.down_proj.mins",
    )


# -- the checkpoint writer ------------------------------------------------------------------------
def test_quantize_writes_packed_tensors_config_and_other_files(tmp_path):
    source = save_tiny("mixtral", tmp_path / "dense")
    (source / "tokenizer.json").write_text("{}")
    out = tmp_path / "q4"
    summary = quantize_checkpoint(source, out, 4, 32, ("attention",))
    names = set(Checkpoint(out).names())
    expert = "model.layers.0.mlp.experts.3.w1."
    if "model.layers.0.block_sparse_moe.experts.3.w1.weight" in Checkpoint(source):
        expert = "model.layers.0.block_sparse_moe.experts.3.w1."
    assert {expert + "qweight", expert + "scales", expert + "mins"} <= names
    assert expert + "weight" not in names
    assert "model.layers.1.self_attn.q_proj.qweight" in names
    assert "lm_head.weight" in names and "model.embed_tokens.weight" in names  # not asked for: dense
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (
        config["bits"] == 4 and config["group_size"] == 32 and config["modules"] == ["experts", "attention"]
    )
    assert (out / "tokenizer.json").read_text() == "{}"
    assert summary.quantized_bytes_after < summary.quantized_bytes_before / 4


def test_quantize_refuses_an_output_it_did_not_write_and_already_quantised_models(tmp_path):
    source = save_tiny("mixtral", tmp_path / "dense")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ShunterError, match="not a model Shunter wrote"):
        quantize_checkpoint(source, foreign, 8)
    assert (foreign / "notes.txt").read_text() == "mine"
    quantize_checkpoint(source, tmp_path / "q8", 8, 32)
    quantize_checkpoint(source, tmp_path / "q8", 4, 32)  # its own output: replaced
    with pytest.raises(ShunterError, match="already quantised"):
        quantize_checkpoint(tmp_path / "q8", tmp_path / "twice", 4, 32)
    with pytest.raises(ShunterError, match="--bits"):
        quantize_checkpoint(source, tmp_path / "q5", 5)
    with pytest.raises(ShunterError, match="does not divide the input dimension 96"):
        quantize_checkpoint(source, tmp_path / "q64", 4, 64)  # the experts' down_proj has 96 inputs
    assert not (tmp_path / "q64").exists()


# -- the quantised model against transformers on the dequantised weights ------------------------
def save_dequantised(source, quantized, directory):
    """The quantised checkpoint's weights unpacked back to dense fp32 tensors, saved under the
    source checkpoint's names with the source's config: a model transformers can load."""
    from safetensors.torch import save_file

    dense_ckpt, packed = Checkpoint(source), Checkpoint(quantized)
    tensors = {}
    for name in dense_ckpt.names():
        qname, scales_name, mins_name = quantized_tensor_names(name)
        if qname not in packed:
            tensors[name] = dense_ckpt.read(name)
            continue
        qweight, scales = packed.read(qname), packed.read(scales_name)
        mins = packed.read(mins_name) if mins_name in packed else None
        group = dense_ckpt.shape(name)[-1] // scales.shape[-1]
        tensors[name] = dequantize(
            QuantizedWeight(qweight, scales, mins, 4 if mins is not None else 8, group)
        )
    directory.mkdir()
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    (directory / "config.json").write_text((source / "config.json").read_text())
    return directory


@pytest.mark.parametrize("bits", [4, 8])
def test_quantised_logits_equal_transformers_on_the_dequantised_weights(tmp_path, bits, monkeypatch):
    """The dequantising path equals transformers on the dequantised weights; the decode kernels
    (x rounded to 8 bits per 32 inputs, as llama.cpp does) stay as close to the dense model."""
    from transformers import AutoModelForCausalLM

    source = save_tiny("mixtral", tmp_path / "dense")
    out = tmp_path / f"q{bits}"
    quantize_checkpoint(source, out, bits, 32, ("attention", "lm_head"))
    oracle = AutoModelForCausalLM.from_pretrained(save_dequantised(source, out, tmp_path / "dequantised"))
    ours = load_model(out).model
    batch = Batch(TOKENS, torch.arange(TOKENS.shape[1])[None], torch.ones_like(TOKENS, dtype=torch.bool), 0)
    with torch.no_grad():
        expected = oracle(TOKENS).logits
        dense = build_hf_model("mixtral")(TOKENS).logits
    with_kernels = ours.forward(batch)
    monkeypatch.setattr(kernels, "available", lambda: False)
    got = ours.forward(batch)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    # and close to the unquantised model: KL(dense || quantised) per token
    for logits in (got, with_kernels):
        kl = F.kl_div(logits.log_softmax(-1), dense.log_softmax(-1), log_target=True, reduction="none")
        assert float(kl.sum(-1).mean()) < (1e-3 if bits == 8 else 5e-2)


# -- quality against the training objective -----------------------------------------------------
def test_quality_of_the_builtin_model_matches_the_training_objective_and_quantisation_costs_little(tmp_path):
    """The reference's bits per byte equal training's evaluation (total_nats, an independent
    forward) on the same windows; a model compared with itself diverges by nothing; the 8-bit copy
    by little."""
    from shunter.model.quality import builtin_heldout_stream, compare_quality
    from shunter.train.objective import bits_per_byte, total_nats

    reference = load_model("shunter-tiny", dtype="float32")
    stream = builtin_heldout_stream(reference.tokenizer, 129)
    same = compare_quality(reference.model, reference.model, stream, reference.tokenizer, window=64)
    plain = load_model("shunter-tiny", dtype="float32", pack=False).model
    nats, predicted = total_nats(plain.weights, plain.spec, stream, 64)
    assert predicted == same.tokens_predicted == 128
    assert same.reference_bits_per_byte == pytest.approx(bits_per_byte(nats, same.text_bytes), rel=1e-3)
    assert same.kl_nats_per_token == pytest.approx(0.0, abs=1e-6) and same.top1_agreement == 1.0
    quantize_checkpoint(reference.path, tmp_path / "q8", 8)
    q8 = compare_quality(
        reference.model,
        load_model(tmp_path / "q8", dtype="float32").model,
        stream,
        reference.tokenizer,
        window=64,
    )
    assert 0 < q8.kl_nats_per_token < 5e-3
    assert abs(q8.candidate_bits_per_byte - q8.reference_bits_per_byte) < 0.02


def test_the_in_memory_engine_keeps_the_packed_bytes_resident(tmp_path):
    source = save_tiny("mixtral", tmp_path / "dense")
    summary = quantize_checkpoint(source, tmp_path / "q4", 4, 32)
    model = load_model(tmp_path / "q4").model
    experts = [layer.moe.expert(e) for layer in model.weights.layers for e in range(8)]
    assert all(
        isinstance(w.gate_up, QuantizedWeight) and isinstance(w.down, QuantizedWeight) for w in experts
    )
    held = sum(w.gate_up.nbytes + w.down.nbytes for w in experts)
    assert held == summary.quantized_bytes_after
