"""Choose the executor for a run: the in-memory one when the weights fit the memory budget with room to
spare (or there is no budget), else the offload engine with the number of micro-batches the caller
gave or the planner picks."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from shunter.model.checkpoint import Checkpoint
from shunter.model.executor import InMemoryModel
from shunter.model.loader import DTYPE_NAMES, load_model
from shunter.model.spec import ModelSpec
from shunter.offload import OffloadedModel, PipelineOptions, load_offloaded, model_bytes
from shunter.offload.planner import (
    MAX_PLANNED_BATCHES,
    BatchPlan,
    expert_share_from_trace,
    explain,
    plan_batches,
)
from shunter.offload.profile import machine_profile, profile_cache_path
from shunter.trace import RoutingTrace


@dataclass
class ExecutorChoice:
    """The executor, the planner's plan when it ran (offload only), and what to tell the user: notes,
    and with explain_plan how many micro-batches run (batches_note)."""

    model: InMemoryModel | OffloadedModel
    plan: BatchPlan | None = None
    notes: list[str] = field(default_factory=list)
    batches_note: str | None = None


def choose_executor(
    path: Path,
    spec: ModelSpec,
    *,
    dtype: str | None,
    memory_bytes: int | None,
    host_memory_bytes: int,
    device: torch.device,
    sequences: int,
    max_slots: int,
    context_tokens: int,
    batches: int | None = 1,
    trace: RoutingTrace | None = None,
    trace_source: str = "trace",
    explain_plan: bool = False,
) -> ExecutorChoice:
    """Open the model at `path` for `sequences` sequences of up to `max_slots` tokens.

    batches None: the planner picks the number of micro-batches for a decode step at
    `context_tokens` (explain_plan also runs it and says why). In memory when there is no budget or
    the weights take at most half of it: the KV cache and activations need their share too."""
    if trace is not None:  # checked even when in memory: a wrong --trace is a mistake either way
        trace.check_fits(spec, trace_source)
    torch_dtype = DTYPE_NAMES[dtype] if dtype else spec.torch_dtype
    element_bytes = torch.tensor([], dtype=torch_dtype).element_size()
    if memory_bytes is None or model_bytes(Checkpoint(path), element_bytes) <= memory_bytes // 2:
        notes = []
        if batches is None or explain_plan:
            notes.append(
                "the model runs in memory (it fits the memory budget, or none was given), "
                "so the offload planner is not used and the number of batches does not apply"
            )
        return ExecutorChoice(load_model(path, dtype, device=device).model, None, notes)
    plan, notes, batches_note = None, [], None
    if batches is None or explain_plan:
        # one sequence per micro-batch: the engine splits the sequences of a forward
        profile = machine_profile(spec, path, torch_dtype, batch_size=1)
        share = expert_share_from_trace(trace) if trace is not None else None
        plan = plan_batches(spec, profile, 1, context_tokens, share, MAX_PLANNED_BATCHES)
    num_batches = batches if batches is not None else min(plan.num_batches, sequences)
    if explain_plan:
        assert plan is not None
        notes.append(explain(plan, sequences_given=sequences))
        batches_note = (
            f"running {num_batches} micro-batch{'es' * (num_batches > 1)} of the "
            f"{sequences} sequence{'s' * (sequences > 1)}; machine profile cached in "
            f"{profile_cache_path(spec, path, torch_dtype)} (delete it to measure again)"
        )
    model = load_offloaded(
        path, memory_bytes, torch_dtype, PipelineOptions(num_batches=num_batches), sequences=sequences,
        max_slots=max_slots, trace=trace, device=device, host_memory_bytes=host_memory_bytes,
    )  # fmt: skip
    return ExecutorChoice(model, plan, notes, batches_note)
