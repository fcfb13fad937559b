"""Assemble a server from a loaded model (the engine thread, metrics, the app) and run it."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from fastapi import FastAPI

from shunter.errors import ShunterError
from shunter.model.checkpoint import Checkpoint
from shunter.model.executor import InMemoryModel
from shunter.model.spec import ModelSpec
from shunter.model.tokenizer import Tokenizer
from shunter.offload import OffloadedModel, model_bytes
from shunter.offload.planner import MAX_PLANNED_BATCHES, plan_batches
from shunter.offload.profile import MachineProfile
from shunter.serve.app import ServedModel, create_app
from shunter.serve.chat import load_chat_template
from shunter.serve.kv_pool import PoolForwards
from shunter.serve.metrics import ServerMetrics
from shunter.serve.scheduler import BatcherOptions, ContinuousBatcher, pool_columns
from shunter.sim.cost import kv_cache_bytes
from shunter.units import format_bytes

# the per-step planner is asked for contexts rounded up to this many tokens (it is pure but not free)
PLAN_CONTEXT_STEP = 64


def kv_pool_bytes(spec: ModelSpec, options: BatcherOptions, element_bytes: int) -> int:
    """The KV pool of a server: max_sequences rows of pool_columns(max_context) tokens."""
    columns = pool_columns(options.max_context)
    return kv_cache_bytes(
        spec.kv_bytes_per_token(element_bytes), options.max_sequences, columns, spec.num_layers
    )


def check_in_memory_budget(
    path: Path, spec: ModelSpec, options: BatcherOptions, dtype: torch.dtype, memory_bytes: int
) -> None:
    """In memory under --memory: the weights and the KV pool must fit it together (the offload
    placement counts the pool itself)."""
    element = torch.tensor([], dtype=dtype).element_size()
    weights, pool = model_bytes(Checkpoint(path), element), kv_pool_bytes(spec, options, element)
    if weights + pool > memory_bytes:
        raise ShunterError(
            f"--memory {format_bytes(memory_bytes)}: the weights ({format_bytes(weights)}) and the KV pool "
            f"of --max-sequences {options.max_sequences} x --max-context {options.max_context} "
            f"({format_bytes(pool)}) do not fit; lower --max-sequences or --max-context, or raise --memory"
        )


def per_step_planner(
    spec: ModelSpec, profile: MachineProfile, expert_share: np.ndarray | None
) -> Callable[[int, int], int]:
    """(active sequences, mean context tokens) -> micro-batches for this step: the offload
    planner's smallest bubble-free n (one sequence per micro-batch), at most the sequences."""

    @functools.lru_cache(maxsize=256)
    def planned(context_bucket: int) -> int:
        return plan_batches(spec, profile, 1, context_bucket, expert_share, MAX_PLANNED_BATCHES).num_batches

    def num_batches(sequences: int, context_tokens: int) -> int:
        bucket = max(1, -(-context_tokens // PLAN_CONTEXT_STEP)) * PLAN_CONTEXT_STEP
        return min(sequences, planned(bucket))

    return num_batches


def build_app(
    model: InMemoryModel | OffloadedModel,
    spec: ModelSpec,
    model_dir: Path,
    options: BatcherOptions,
    name: str | None = None,
    plan_num_batches: Callable[[int, int], int] | None = None,
    forwards: PoolForwards | None = None,
) -> FastAPI:
    """The app serving `model` (its lifespan runs the engine thread); `forwards`: see
    ContinuousBatcher."""
    tokenizer = Tokenizer.from_model_dir(model_dir)
    metrics = ServerMetrics()
    batcher = ContinuousBatcher(model, spec, tokenizer, options, metrics, plan_num_batches, forwards)
    served = ServedModel(
        name or Path(model_dir).name, spec.vocab_size, options.max_context, tokenizer,
        load_chat_template(model_dir),
    )  # fmt: skip
    return create_app(batcher, served, metrics)
