"""Lina's expert packing: while an expert-FFN micro-op is shorter than an all-to-all micro-op, put
twice the experts on every rank.

Packing halves the expert-parallel degree P: with N ranks, groups of P/2 ranks each hold every
expert, and the N/(P/2) ranks at one position of every group hold the same experts (replicas that
sum their gradients after backward, `shunter.train.parallel`). Each all-to-all then has half the
peers and each rank's FFN twice the experts' rows, so the FFN work of a chunk can cover the
transfer of the next one (`--a2a-chunks`). The math does not change: the same tokens meet the same
experts; only where an expert's rows are computed and its gradient summed moves.

The rule (`PackingRule`, Lina section 4.2): from step `from_step` and every `every` steps after,
every rank measures its last step's median FFN micro-op (one chunk's expert FFN, forward) and
all-to-all micro-op (one chunk's dispatch or combine, forward); their means over the ranks decide
for all, identically. P is halved while it is even and stays at least `min_expert_parallel`
(packing never turns the run into plain data parallelism: the comparison needs an all-to-all).

Lina's rule does not price what packing adds: the replicas' allreduce of their experts' gradients.
Where the batch is small beside the experts it costs more than the all-to-all bytes packing
saves (measured: docs/benchmarks.md, 0.70x of Lina without packing), so the default rule
("priced") also asks that the all-to-all bytes a rank's port saves per step exceed the
expert-gradient bytes it adds (`packing_bytes`, under an even gate); "lina" is the paper's rule
alone. Applying it is a one-time exchange: every rank gathers every expert's weights and AdamW
state (`gather_expert_state`) and keeps the stacks of its new position.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import torch
import torch.distributed as dist

from shunter.errors import FieldError
from shunter.train.comm import StepTimeline

DEFAULT_PACKING_FROM_STEP = 10  # Lina measures from step 10
DEFAULT_PACKING_EVERY = 4  # and adjusts every 4 steps
PACKING_RULES = ("priced", "lina")
EXPERT_TENSORS = ("gate_up", "down")


@dataclass(frozen=True)
class PackingRule:
    """When to pack: checked after step from_step and every `every` steps after it; pack while the
    FFN micro-op takes less than threshold x the all-to-all micro-op (Lina: 1) and P/2 is at
    least min_expert_parallel; rule "priced" also while packing saves more bytes than it adds."""

    from_step: int = DEFAULT_PACKING_FROM_STEP
    every: int = DEFAULT_PACKING_EVERY
    threshold: float = 1.0
    min_expert_parallel: int = 2
    rule: str = "priced"

    def validate(self, expert_parallel: int, planned: bool) -> None:
        if self.rule not in PACKING_RULES:
            raise FieldError("packing_rule", f"{self.rule!r} is not one of {', '.join(PACKING_RULES)}")
        if self.from_step < 1:
            raise FieldError("packing_from_step", f"must be at least 1, got {self.from_step}")
        if self.every < 1:
            raise FieldError("packing_every", f"must be at least 1, got {self.every}")
        if not (math.isfinite(self.threshold) and self.threshold > 0):
            raise FieldError("packing_threshold", f"must be a positive finite number, got {self.threshold}")
        if planned:
            raise FieldError(
                "expert_packing",
                "packing re-places the experts contiguously; it cannot keep a --plan's placement",
            )
        if expert_parallel % 2 or expert_parallel // 2 < self.min_expert_parallel:
            raise FieldError(
                "expert_packing",
                f"--expert-parallel {expert_parallel} cannot be halved: packing keeps an even number of at "
                f"least {self.min_expert_parallel} expert-parallel ranks (use at least "
                f"{2 * self.min_expert_parallel})",
            )

    def due(self, completed_steps: int) -> bool:
        """Whether to decide after this many completed steps."""
        return completed_steps >= self.from_step and (completed_steps - self.from_step) % self.every == 0

    def packed(
        self,
        expert_parallel: int,
        ffn_micro_op_s: float,
        a2a_micro_op_s: float,
        saved_bytes: float = math.inf,
        added_bytes: float = 0.0,
    ) -> int:
        """The expert-parallel degree after this decision (pure: numbers in, degree out);
        saved_bytes / added_bytes: `packing_bytes` of halving it (only the "priced" rule asks)."""
        halved = expert_parallel // 2
        if expert_parallel % 2 or halved < self.min_expert_parallel:
            return expert_parallel
        if self.rule == "priced" and saved_bytes <= added_bytes:
            return expert_parallel
        return halved if ffn_micro_op_s < self.threshold * a2a_micro_op_s else expert_parallel


def packing_bytes(
    expert_parallel: int,
    world_size: int,
    num_layers: int,
    rows_per_rank: int,
    row_bytes: int,
    num_experts: int,
    expert_bytes: int,
) -> tuple[float, float]:
    """(all-to-all bytes, expert-allreduce bytes) per step through one rank's port that halving
    the expert-parallel degree P saves and adds, under an even gate.

    Each MoE layer runs four all-to-alls of a rank's rows_per_rank rows (dispatch and combine,
    forward and backward); a row leaves its rank with probability (P - 1) / P, (P - 2) / P after
    halving: 4 L R row_bytes / P saved. The replicas' ring allreduce sends 2 (m - 1) / m of a rank's
    expert-gradient bytes, m = world / P replicas of E / P experts in each of the L layers: from m
    to 2m replicas of twice the experts. expert_bytes: one expert's gradient in one layer."""
    P, n = expert_parallel, world_size

    def ring(replicas: int, nbytes: float) -> float:
        return 2 * (replicas - 1) / replicas * nbytes

    saved = 4 * num_layers * rows_per_rank * row_bytes / P
    held = num_layers * num_experts / P * expert_bytes  # expert-gradient bytes on a rank
    added = ring(2 * n // P, 2 * held) - ring(n // P, held)
    return saved, added


def micro_op_times(timeline: StepTimeline) -> tuple[float, float]:
    """(median FFN micro-op s, median forward all-to-all micro-op s) of this rank's last step; 0
    where it had none (an FFN micro-op with no rows is not run)."""
    ffn = statistics.median(timeline.ffn) if timeline.ffn else 0.0
    a2a = [end - start for start, end in timeline.a2a_forward]
    return ffn, statistics.median(a2a) if a2a else 0.0


def agreed_micro_op_times(timeline: StepTimeline) -> tuple[float, float]:
    """micro_op_times averaged over every rank (an allreduce: every rank gets the same numbers)."""
    times = torch.tensor(micro_op_times(timeline), dtype=torch.float64)
    dist.all_reduce(times)
    ffn, a2a = (times / dist.get_world_size()).tolist()
    return ffn, a2a


def gather_expert_state(
    blocks, optimizer: torch.optim.Optimizer, num_experts: int
) -> list[dict[str, torch.Tensor]]:
    """Per MoE layer, every expert's stacks as [E, ...] tensors on every rank: "gate_up", "down"
    and their AdamW state ("gate_up.exp_avg", ...; "step" once). One all_gather_object over the
    world; replicas hold equal values, so which one lands last does not matter."""
    mine = []
    for block in blocks:
        entry: dict[str, object] = {"ids": list(block.local_ids)}
        for name in EXPERT_TENSORS:
            tensor = getattr(block, name)
            entry[name] = tensor.detach()
            for key, value in optimizer.state.get(tensor, {}).items():
                entry[key if key == "step" else f"{name}.{key}"] = value.detach()
        mine.append(entry)
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    layers = []
    for i in range(len(blocks)):
        full: dict[str, torch.Tensor] = {}
        for rank_layers in everyone:
            entry = rank_layers[i]
            ids = entry["ids"]
            for key, value in entry.items():
                if key == "ids":
                    continue
                if key == "step":
                    full[key] = value
                    continue
                if key not in full:
                    full[key] = value.new_zeros((num_experts, *value.shape[1:]))
                full[key][ids] = value
        layers.append(full)
    return layers


def adamw_state_of(full: dict[str, torch.Tensor], name: str, ids: list[int]) -> dict[str, torch.Tensor]:
    """The AdamW state of a new stack `name` holding experts ids, cut from gather_expert_state's
    full stacks (empty before the first step)."""
    prefix = f"{name}."
    state = {key[len(prefix) :]: value[ids].clone() for key, value in full.items() if key.startswith(prefix)}
    if state and "step" in full:
        state["step"] = full["step"].clone()
    return state
