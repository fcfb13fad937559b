"""Write a quantised copy of a Hugging Face checkpoint: which tensors, in what layout, atomically.

Every weight chosen (routed experts always; shared experts and dense MLPs, attention and the LM
head on request) becomes `X.qweight`, `X.scales`, `X.mins` (see shunter.model.quant and
docs/quantization.md); every other tensor is copied as it is. config.json gains a
`quantization_config` naming the method, bits, group size and modules; the other files of the
model directory (tokenizer, traces) are copied.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from shunter.errors import ShunterError
from shunter.model.checkpoint import INDEX_FILE, Checkpoint
from shunter.model.export import OUTPUT_MARKER, check_replaceable, publish_staged_model
from shunter.model.quant import (
    DEFAULT_GROUP_SIZE,
    QUANT_METHOD,
    SUPPORTED_BITS,
    quantize,
    quantized_tensor_names,
)
from shunter.model.spec import ModelSpec, load_spec
from shunter.model.weights import CheckpointLayout

# what --include may add to the routed experts
OPTIONAL_MODULES = ("shared", "attention", "lm_head")
_ATTENTION_PROJECTIONS = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "q_a_proj",
    "q_b_proj",
    "kv_a_proj_with_mqa",
    "kv_b_proj",
)


@dataclass
class QuantizeSummary:
    out_dir: str
    bits: int
    group_size: int
    modules: list[str]
    quantized_tensors: int = 0
    copied_tensors: int = 0
    bytes_before: int = 0  # bytes of every tensor in the source files
    bytes_after: int = 0  # the same in the written files
    quantized_bytes_before: int = 0  # the quantised weights alone, before and after
    quantized_bytes_after: int = 0


def weights_to_quantize(spec: ModelSpec, checkpoint: Checkpoint, modules: tuple[str, ...]) -> dict[str, bool]:
    """Checkpoint tensor name -> whether it is stored input-major ([..., in, out]: gpt-oss and
    Llama 4 experts), for every weight of `modules` ("experts" plus any of OPTIONAL_MODULES)."""
    layout = CheckpointLayout(spec, checkpoint)
    chosen: dict[str, bool] = {}
    input_major = spec.family in ("gpt_oss", "llama4_text")
    for layer in range(spec.num_layers):
        prefix = layout.layer_prefix(layer)
        if spec.moe_layers[layer]:
            moe = layout.moe_prefix(layer)
            if input_major or layout.fused_experts(layer):
                for name in ("experts.gate_up_proj", "experts.down_proj"):
                    chosen[moe + name] = input_major
            else:
                for expert in range(spec.num_experts):
                    chosen.update(dict.fromkeys(layout.expert_names(layer, expert), False))
            if "shared" in modules:
                for shared in ("shared_expert.", "shared_experts."):
                    for proj in ("gate_proj", "up_proj", "down_proj"):
                        chosen[f"{moe}{shared}{proj}.weight"] = False
        elif "shared" in modules:  # a dense layer's MLP
            mlp = prefix + ("feed_forward." if spec.family == "llama4_text" else "mlp.")
            for proj in ("gate_proj", "up_proj", "down_proj"):
                chosen[f"{mlp}{proj}.weight"] = False
        if "attention" in modules and not spec.is_linear_attention(layer):
            for proj in _ATTENTION_PROJECTIONS:
                chosen[f"{prefix}self_attn.{proj}.weight"] = False
    if "lm_head" in modules:
        if spec.tie_word_embeddings:
            raise ShunterError(
                "--include lm_head: this model ties its LM head to the embedding, which stays dense; "
                "leave lm_head out"
            )
        chosen["lm_head.weight"] = False
    return {name: major for name, major in chosen.items() if name in checkpoint}


def quantize_checkpoint(
    model_dir: str | Path,
    out_dir: str | Path,
    bits: int,
    group_size: int = DEFAULT_GROUP_SIZE,
    include: tuple[str, ...] = (),
    overwrite: bool = False,
    progress: Callable[[str], None] | None = None,
    device: torch.device | str = "cpu",
) -> QuantizeSummary:
    """Write the quantised copy of `model_dir` to `out_dir` (one output file per input file), all
    at once or not at all: a sibling temporary directory replaces `out_dir` at the end. `out_dir` is
    refused if it holds anything Shunter did not write, unless `overwrite`. `device` computes the
    fits (a GPU fits a 12 GB checkpoint's 4-bit groups in seconds where a CPU takes minutes)."""
    model_dir = Path(model_dir)
    if bits not in SUPPORTED_BITS:
        raise ShunterError(f"--bits: must be 4 or 8, got {bits}")
    if group_size <= 0 or group_size % 2:
        raise ShunterError(f"--group-size: must be a positive even number, got {group_size}")
    unknown = [m for m in include if m not in OPTIONAL_MODULES]
    if unknown:
        raise ShunterError(
            f"--include: unknown module {unknown[0]!r}; choose from {', '.join(OPTIONAL_MODULES)}"
        )
    spec = load_spec(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    if "quantization_config" in config:
        raise ShunterError(
            f"{model_dir / 'config.json'}: quantization_config: the model is already quantised"
        )
    checkpoint = Checkpoint(model_dir)
    modules = ("experts", *include)
    chosen = weights_to_quantize(spec, checkpoint, modules)
    out_dir = Path(os.path.abspath(out_dir))
    if out_dir == model_dir.resolve():
        raise ShunterError(f"--out: {out_dir} is the model being quantised; choose another directory")
    check_replaceable(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    summary = QuantizeSummary(str(out_dir), bits, group_size, list(modules))
    staging = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".tmp"))
    try:
        files = sorted({loc.file for loc in checkpoint.locations.values()})
        weight_map: dict[str, str] = {}
        for number, file in enumerate(files, 1):
            tensors = {}
            names = [n for n, loc in checkpoint.locations.items() if loc.file == file]
            for name in names:
                tensor = checkpoint.read(name)
                summary.bytes_before += tensor.numel() * tensor.element_size()
                if name not in chosen:
                    tensors[name] = tensor.contiguous()
                    summary.copied_tensors += 1
                    continue
                weight = tensor.transpose(-1, -2) if chosen[name] else tensor
                quantized = quantize(weight.to(device), bits, group_size, what=f"{file}: tensor {name!r}")
                parts = (quantized.packed, quantized.scales, quantized.mins)
                for part_name, part in zip(quantized_tensor_names(name), parts, strict=True):
                    if part is not None:
                        tensors[part_name] = part.cpu().contiguous()
                summary.quantized_tensors += 1
                summary.quantized_bytes_before += tensor.numel() * tensor.element_size()
                summary.quantized_bytes_after += quantized.nbytes
                if progress is not None and summary.quantized_tensors % 64 == 0:
                    progress(f"{file.name}: {summary.quantized_tensors}/{len(chosen)} weights quantised")
            summary.bytes_after += sum(t.numel() * t.element_size() for t in tensors.values())
            save_file(tensors, staging / file.name, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(tensors, file.name))
            if progress is not None:
                progress(
                    f"{file.name}: {number}/{len(files)} files, {summary.quantized_tensors} weights quantised"
                )
        if len(files) > 1 or (model_dir / INDEX_FILE).is_file():
            index = {"metadata": {"total_size": summary.bytes_after}, "weight_map": weight_map}
            (staging / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        config["quantization_config"] = {
            "quant_method": QUANT_METHOD,
            "bits": bits,
            "group_size": group_size,
            "symmetric": bits == 8,
            "modules": list(modules),
            "layout": "X.weight -> X.qweight, X.scales, X.mins; see docs/quantization.md",
        }
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        _copy_other_files(model_dir, staging, {f.name for f in files} | {INDEX_FILE, "config.json"})
        publish_staged_model(staging, out_dir, overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return summary


def _copy_other_files(model_dir: Path, staging: Path, written: set[str]) -> None:
    """The model directory's other plain files (tokenizer, generation config, routing trace)."""
    for source in model_dir.iterdir():
        if source.is_file() and source.name not in written and source.name != OUTPUT_MARKER:
            shutil.copyfile(source, staging / source.name)


def stderr_progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
