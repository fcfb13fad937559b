"""MoE model runtime: specs, checkpoints, layer functions, the in-memory executor and generation."""

from shunter.model.checkpoint import Checkpoint
from shunter.model.executor import Batch, InMemoryModel, KVCache
from shunter.model.generate import GenerationResult, SamplingParams, generate
from shunter.model.loader import LoadedModel, load_model
from shunter.model.spec import SUPPORTED_FAMILIES, ModelSpec, load_spec, spec_from_config

__all__ = [
    "SUPPORTED_FAMILIES",
    "Batch",
    "Checkpoint",
    "GenerationResult",
    "InMemoryModel",
    "KVCache",
    "LoadedModel",
    "ModelSpec",
    "SamplingParams",
    "generate",
    "load_model",
    "load_spec",
    "spec_from_config",
]
