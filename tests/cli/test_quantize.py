"""`shunter quantize` as a user runs it: a JSON summary, and bad input refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from shunter.model.checkpoint import Checkpoint
from tests.cli.harness import refused, run_in
from tests.tiny_models import save_tiny


def test_quantize_prints_a_json_summary_and_writes_a_model_every_engine_reads(tmp_path: Path) -> None:
    code, out, err = run_in(["quantize", "shunter-tiny", "--bits", "4", "--out", "q4", "--json"], tmp_path)
    assert code == 0, err
    summary = json.loads(out)
    assert summary["bits"] == 4 and summary["group_size"] == 64 and summary["modules"] == ["experts"]
    assert summary["quantized_bytes_after"] / summary["quantized_bytes_before"] == pytest.approx(0.28125)
    assert "weights quantised" in err  # progress goes to stderr
    assert any(name.endswith(".qweight") for name in Checkpoint(tmp_path / "q4").names())
    code, out, err = run_in(["generate", "q4", "--prompt-ids", "1,2,3", "--max-new-tokens", "3"], tmp_path)
    assert code == 0, err


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    return save_tiny("mixtral", tmp_path / "m")


@pytest.mark.parametrize(
    ("flags", "expect"),
    [
        (["--bits", "5"], "--bits: must be 4 or 8"),
        (["--bits", "4", "--group-size", "48"], "group size 48 does not divide the input dimension 64"),
        (["--bits", "4", "--group-size", "7"], "--group-size"),
        (["--bits", "4", "--include", "embeddings"], "--include: unknown module 'embeddings'"),
    ],
)
def test_bad_settings_are_refused_in_one_line(tiny: Path, tmp_path: Path, flags, expect) -> None:
    line = refused(["quantize", "m", *flags, "--out", "q"], tmp_path)
    assert expect in line, line


def test_an_output_directory_shunter_did_not_write_is_refused(tiny: Path, tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    line = refused(["quantize", "m", "--bits", "8", "--out", "mine"], tmp_path)
    assert "not a model Shunter wrote" in line


def test_a_non_finite_weight_is_refused_naming_the_file_and_tensor(tiny: Path, tmp_path: Path) -> None:
    tensors = load_file(tiny / "model.safetensors")
    name = next(n for n in tensors if ".experts." in n and n.endswith(".weight"))
    tensors[name][0, 0] = float("inf")
    save_file(tensors, tiny / "model.safetensors", metadata={"format": "pt"})
    line = refused(["quantize", "m", "--bits", "4", "--group-size", "32", "--out", "q"], tmp_path)
    assert "model.safetensors" in line and name in line and "non-finite" in line, line
    assert torch.isinf(load_file(tiny / "model.safetensors")[name][0, 0])
