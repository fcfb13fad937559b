"""Write models in Hugging Face layout (config.json + safetensors) that shunter and transformers load.

Used for models shunter makes itself: the demo's deterministic model and trained models.
Only the Mixtral layout is written (per-expert `block_sparse_moe.experts.{e}.w1/w2/w3`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from shunter.errors import ShunterError
from shunter.model.spec import ModelSpec, spec_from_config
from shunter.model.weights import AttentionWeights, LayerWeights, MLPWeights, ModelWeights, MoEWeights


def mixtral_config(
    *,
    vocab_size: int,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    num_experts: int,
    top_k: int,
    intermediate_size: int,
    max_position_embeddings: int = 2048,
    rope_theta: float = 10000.0,
    rms_norm_eps: float = 1e-5,
    dtype: str = "float32",
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    tie_word_embeddings: bool = False,
) -> dict[str, Any]:
    """A Mixtral config.json as transformers writes it (both rope spellings, for old and new readers)."""
    return {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "num_local_experts": num_experts,
        "num_experts_per_tok": top_k,
        "max_position_embeddings": max_position_embeddings,
        "rms_norm_eps": rms_norm_eps,
        "rope_theta": rope_theta,
        "rope_parameters": {"rope_theta": rope_theta, "rope_type": "default"},
        "hidden_act": "silu",
        "sliding_window": None,
        "tie_word_embeddings": tie_word_embeddings,
        "dtype": dtype,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "router_aux_loss_coef": 0.0,
    }


def random_weights(
    spec: ModelSpec, seed: int, std: float = 0.02, router_std: float = 0.5, device: torch.device | str = "cpu"
) -> ModelWeights:
    """Deterministic random weights for a Mixtral-layout spec (fp32), drawn on `device` (a GPU draws
    billions in seconds; its stream differs from the CPU's for the same seed). Norm weights are ones."""
    if spec.family != "mixtral" or spec.attention != "gqa":
        raise ShunterError(f"random weights are only made for the mixtral family, not {spec.family!r}")
    g = torch.Generator(device=device).manual_seed(seed)
    normal = lambda *shape, s=std: torch.randn(*shape, generator=g, device=device) * s
    H, E, I = spec.hidden_size, spec.num_experts, spec.expert_intermediate_size
    q_out, kv_out = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    layers = []
    for _ in range(spec.num_layers):
        attention = AttentionWeights(
            q=normal(q_out, H), k=normal(kv_out, H), v=normal(kv_out, H), o=normal(H, q_out)
        )
        moe = MoEWeights(
            router=normal(E, H, s=router_std),
            experts_gate_up=normal(E, 2 * I, H),
            experts_down=normal(E, H, I),
        )
        layers.append(
            LayerWeights(torch.ones(H, device=device), attention, torch.ones(H, device=device), moe=moe)
        )
    embed = normal(spec.vocab_size, H)
    lm_head = embed if spec.tie_word_embeddings else normal(spec.vocab_size, H)
    return ModelWeights(embed=embed, layers=layers, final_norm=torch.ones(H, device=device), lm_head=lm_head)


def mixtral_tensors(spec: ModelSpec, weights: ModelWeights) -> dict[str, torch.Tensor]:
    """Checkpoint names -> tensors in the per-expert Mixtral layout, cast to the spec's dtype."""
    dtype = spec.torch_dtype
    out: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": weights.embed,
        "model.norm.weight": weights.final_norm,
    }
    if not spec.tie_word_embeddings:
        out["lm_head.weight"] = weights.lm_head
    I = spec.expert_intermediate_size
    for i, layer in enumerate(weights.layers):
        p = f"model.layers.{i}."
        a = layer.attention
        out |= {
            p + "input_layernorm.weight": layer.attn_norm,
            p + "post_attention_layernorm.weight": layer.mlp_norm,
            p + "self_attn.q_proj.weight": a.q,
            p + "self_attn.k_proj.weight": a.k,
            p + "self_attn.v_proj.weight": a.v,
            p + "self_attn.o_proj.weight": a.o,
        }
        if layer.moe is None:
            raise ShunterError(f"layer {i} has no MoE weights; the Mixtral layout needs every layer sparse")
        out[p + "block_sparse_moe.gate.weight"] = layer.moe.router
        for e in range(spec.num_experts):
            expert: MLPWeights = layer.moe.expert(e)
            q = f"{p}block_sparse_moe.experts.{e}."
            out[q + "w1.weight"] = expert.gate_up[:I]
            out[q + "w3.weight"] = expert.gate_up[I:]
            out[q + "w2.weight"] = expert.down
    # safetensors refuses tensors that share storage: give each its own contiguous copy, in host memory
    return {name: t.detach().to("cpu", dtype, copy=True).contiguous() for name, t in out.items()}


# Written into every model directory Shunter makes: only such a directory (or an empty one) is
# replaced by a later export without `overwrite`.
OUTPUT_MARKER = ".shunter-model"


def check_replaceable(out_dir: str | Path, overwrite: bool = False) -> None:
    """Refuse an output directory that holds anything Shunter did not write, unless overwrite says so.

    Called before any long work, and again just before the rename that replaces the directory."""
    out_dir = Path(out_dir)
    if not out_dir.exists() and not out_dir.is_symlink():
        return
    if not out_dir.is_dir() or out_dir.is_symlink():
        raise ShunterError(f"{out_dir}: exists and is not a directory; choose another output path")
    if overwrite or (out_dir / OUTPUT_MARKER).is_file() or not any(out_dir.iterdir()):
        return
    raise ShunterError(
        f"{out_dir}: directory is not empty and is not a model Shunter wrote; choose a new path, "
        "or pass --overwrite to replace it"
    )


def save_checkpoint(
    config: dict[str, Any],
    weights: ModelWeights,
    out_dir: str | Path,
    tokenizer_json: str | Path | None = None,
    extra_files: dict[str, str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write config.json, model.safetensors (and tokenizer.json, and extra text files) into out_dir,
    atomically: everything goes to a sibling temporary directory that replaces out_dir at the end.

    An existing out_dir is replaced only if it is empty, was written by Shunter (it holds
    OUTPUT_MARKER), or `overwrite` is set; anything else is refused before a byte is written."""
    out_dir = Path(os.path.abspath(out_dir))
    spec = spec_from_config(config, source=str(out_dir / "config.json"))
    tensors = mixtral_tensors(spec, weights)
    check_replaceable(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    if not os.access(out_dir.parent, os.W_OK):
        raise ShunterError(f"{out_dir.parent}: directory is not writable")
    staging = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".tmp"))
    try:
        save_file(tensors, staging / "model.safetensors", metadata={"format": "pt"})
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if tokenizer_json is not None:
            shutil.copyfile(tokenizer_json, staging / "tokenizer.json")
        for name, text in (extra_files or {}).items():
            (staging / name).write_text(text)
        publish_staged_model(staging, out_dir, overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def publish_staged_model(staging: Path, out_dir: Path, overwrite: bool) -> None:
    """Mark a fully written model directory as Shunter's, make it readable, and rename it to
    out_dir, replacing an earlier one only as check_replaceable allows."""
    (staging / OUTPUT_MARKER).write_text("written by shunter: a later export may replace this\n")
    # mkdtemp makes a private directory; a model directory is as readable as any other
    os.chmod(staging, 0o755)
    for file in staging.iterdir():
        os.chmod(file, 0o644)
    check_replaceable(out_dir, overwrite)
    if out_dir.exists():
        # move the old directory aside first, so a failure between the two renames loses nothing
        retired = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".old"))
        os.replace(out_dir, retired / out_dir.name)
        os.replace(staging, out_dir)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(staging, out_dir)
