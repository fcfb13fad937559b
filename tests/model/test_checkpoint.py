"""Checkpoint loading: sharded files, bf16, and one clear error for each kind of bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from shunter.cli import main
from shunter.errors import ShunterError
from shunter.model import Batch, load_model
from shunter.model.checkpoint import Checkpoint
from shunter.model.spec import SUPPORTED_FAMILIES

TOKENS = torch.tensor([[5, 9, 2, 7, 1, 3]])
ONE_SEQUENCE = Batch(TOKENS, torch.arange(6)[None], torch.ones(1, 6, dtype=torch.bool), 0)


def _copy(src, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(src, dst)
    return dst


def _rewrite_tensors(model_dir, edit):
    path = model_dir / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_sharded_checkpoint_loads_and_gives_the_same_logits(tiny_checkpoint):
    single = tiny_checkpoint("qwen2_moe")
    sharded = tiny_checkpoint("qwen2_moe", max_shard_size="40KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) > 1
    expected = load_model(single).model.forward(ONE_SEQUENCE)
    actual = load_model(sharded).model.forward(ONE_SEQUENCE)
    # the weights are bit-equal (tested in the loader); the logits may differ in the last ulp since
    # tensors memory-mapped from other files sit at other alignments, which picks other SIMD paths
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-6)


def test_bf16_checkpoint_runs_in_bf16_and_tracks_transformers(tiny_checkpoint):
    from transformers import AutoModelForCausalLM

    path = tiny_checkpoint("mixtral", dtype=torch.bfloat16)
    loaded = load_model(path)
    assert loaded.spec.dtype == "bfloat16"
    assert loaded.model.weights.embed.dtype == torch.bfloat16
    assert loaded.model.weights.layers[0].moe.expert(0).gate_up.dtype == torch.bfloat16
    actual = loaded.model.forward(ONE_SEQUENCE)
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        expected = reference(input_ids=TOKENS).logits.float()
    # bf16 keeps ~3 significant digits; both runs round the same math at the same points
    assert (actual - expected).abs().max().item() <= 0.05 * expected.abs().max().item()


def test_directory_without_config_json_names_the_file(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ShunterError, match=r"config\.json: missing"):
        load_model(tmp_path)


def test_unknown_model_type_lists_the_supported_families(tiny_checkpoint, tmp_path):
    model_dir = _copy(tiny_checkpoint("mixtral"), tmp_path)
    config = json.loads((model_dir / "config.json").read_text())
    config["model_type"] = "llama"
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ShunterError) as error:
        load_model(model_dir)
    message = str(error.value)
    assert "config.json" in message and "'llama'" in message
    assert all(family in message for family in SUPPORTED_FAMILIES)


def test_missing_tensor_is_named(tiny_checkpoint, tmp_path):
    model_dir = _copy(tiny_checkpoint("mixtral"), tmp_path)
    name = "model.layers.1.block_sparse_moe.experts.3.w2.weight"
    _rewrite_tensors(model_dir, lambda t: t.pop(name))
    with pytest.raises(ShunterError, match=rf"tensor '{name}' is missing"):
        load_model(model_dir)


def test_tensor_of_the_wrong_shape_is_named_with_both_shapes(tiny_checkpoint, tmp_path):
    model_dir = _copy(tiny_checkpoint("olmoe"), tmp_path)
    name = "model.layers.0.self_attn.q_proj.weight"
    _rewrite_tensors(model_dir, lambda t: t.update({name: t[name][:32].contiguous()}))
    with pytest.raises(ShunterError, match=r"q_proj\.weight' has shape \[32, 64\], expected \[64, 64\]"):
        load_model(model_dir)


def test_truncated_safetensors_file_is_detected_before_loading(tiny_checkpoint, tmp_path):
    model_dir = _copy(tiny_checkpoint("mixtral"), tmp_path)
    path = model_dir / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ShunterError, match=r"model\.safetensors: truncated safetensors file"):
        Checkpoint(model_dir)


def test_prompt_ids_outside_the_vocabulary_exit_nonzero_with_one_line(tiny_checkpoint, capsys):
    status = main(
        ["generate", str(tiny_checkpoint("mixtral")), "--prompt-ids", "1,2,96", "--max-new-tokens", "2"]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert status != 0
    assert err == ["shunter: error: --prompt-ids: token id 96 is outside the vocabulary [0, 96)"]


@pytest.mark.parametrize(
    "argv_tail, message",
    [
        (["--prompt-ids", "1,x"], "expected comma-separated integers"),
        (["--prompt", "hello"], "no tokenizer.json"),
        (["--prompt-ids", "1", "--max-new-tokens", "0"], "--max-new-tokens"),
    ],
)
def test_bad_generate_arguments_exit_nonzero(tiny_checkpoint, capsys, argv_tail, message):
    status = main(["generate", str(tiny_checkpoint("mixtral")), *argv_tail])
    assert status == 2
    assert message in capsys.readouterr().err


def test_a_missing_model_directory_is_a_clear_error(tmp_path, capsys):
    status = main(["generate", str(tmp_path / "nope"), "--prompt-ids", "1"])
    assert status == 2
    assert "no such model directory or built-in model" in capsys.readouterr().err


def _break(kind, model_dir):
    if kind == "no_config":
        (model_dir / "config.json").unlink()
    elif kind == "unknown_family":
        config = json.loads((model_dir / "config.json").read_text())
        (model_dir / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    elif kind == "missing_tensor":
        _rewrite_tensors(model_dir, lambda t: t.pop("model.norm.weight"))
    elif kind == "wrong_shape":
        _rewrite_tensors(model_dir, lambda t: t.update({"model.norm.weight": torch.ones(3)}))
    elif kind == "truncated":
        path = model_dir / "model.safetensors"
        path.write_bytes(path.read_bytes()[:-100])


@pytest.mark.parametrize(
    "kind, names",
    [
        ("no_config", "config.json: missing"),
        ("unknown_family", "model_type 'gpt2' is not supported"),
        ("missing_tensor", "tensor 'model.norm.weight' is missing"),
        ("wrong_shape", "tensor 'model.norm.weight' has shape [3], expected [64]"),
        ("truncated", "model.safetensors: truncated safetensors file"),
    ],
)
def test_bad_checkpoints_exit_nonzero_with_one_line_on_stderr(tiny_checkpoint, tmp_path, capsys, kind, names):
    model_dir = _copy(tiny_checkpoint("mixtral"), tmp_path)
    _break(kind, model_dir)
    status = main(["generate", str(model_dir), "--prompt-ids", "1,2", "--max-new-tokens", "2", "--json"])
    captured = capsys.readouterr()
    assert status == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("shunter: error: ") and names in lines[0]
    assert captured.out == ""  # nothing half-printed


def test_a_header_whose_byte_range_disagrees_with_the_shape_is_named(tiny_checkpoint, tmp_path):
    """A byte range that is not shape x dtype would be read as garbage (or past its neighbour)."""
    model_dir = _copy(tiny_checkpoint("mixtral"), tmp_path)
    path = model_dir / "model.safetensors"
    raw = path.read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + header_len])
    name = "model.norm.weight"
    header[name]["shape"] = [header[name]["shape"][0] * 2]
    text = json.dumps(header, separators=(",", ":")).encode().ljust(header_len)
    assert len(text) == header_len
    path.write_bytes(raw[:8] + text + raw[8 + header_len :])
    with pytest.raises(ShunterError, match=r"model\.norm\.weight.*bytes for shape"):
        Checkpoint(model_dir)


def test_a_loaded_model_keeps_no_map_of_its_checkpoint(tiny_checkpoint):
    """Mapped pages stay in the resident set beside the loaded copy (twice the model's bytes)."""
    model_dir = tiny_checkpoint("qwen2_moe")
    loaded = load_model(model_dir)
    maps = Path("/proc/self/maps").read_text()
    assert str((model_dir / "model.safetensors").resolve()) not in maps
    assert loaded.model.forward(ONE_SEQUENCE).isfinite().all()
