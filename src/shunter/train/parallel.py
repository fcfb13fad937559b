"""Expert- and data-parallel training on torch.distributed (the options and the trainer).

Launched by torchrun (`torchrun --nproc-per-node N -m shunter train ... --expert-parallel N`), one
process per rank. Each rank:
- trains on its slice of every global batch (sequences [r*B/n, (r+1)*B/n) of `batch_at`);
- holds a full copy of the dense weights (embeddings, norms, attention, routers) and the routed
  experts its placement gives it (contiguous blocks, or an exclusive plan's slots);
- runs each MoE layer expert-parallel (`shunter.train.expert_parallel`: differentiable all-to-alls,
  optionally chunked and pipelined with the expert FFN, `--a2a-chunks`);
- computes its part of the global loss (`language_model_loss` with `batch_share`), so the sum of
  the ranks' dense gradients is the single-process gradient of the global batch; dense gradients
  are summed across ranks by one of the schedulers of `shunter.train.comm` (`--comm overlap,
  priority, lina`), expert gradients stay where they are.

With N ranks and --expert-parallel P < N (P dividing N), ranks [d*P, (d+1)*P) form expert-parallel
group d, each group holds every expert once, and the ranks at one position of every group
(replicas of the same experts) sum their expert gradients after backward; the balance loss then
counts routing over every group.

With --expert-packing (`shunter.train.packing`, Lina's third piece), P is halved during the run
while an expert-FFN micro-op is shorter than an all-to-all micro-op: new groups, a one-time
exchange of the experts' weights and optimizer state, the same math. The checkpoint records the P
it was saved under, and --resume continues with it.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from shunter.errors import FieldError, ShunterError
from shunter.files import atomic_output
from shunter.model.weights import ModelWeights
from shunter.parallel.moe import (
    contiguous_placement,
)
from shunter.plan.slots import ExpertSlots
from shunter.train.comm import (
    COMM_SCHEDULERS,
    GradientSync,
    Segment,
    StepTimeline,
    bucket_ops,
    micro_ops,
    overlap_length,
    union_length,
)
from shunter.train.expert_parallel import ExchangeContext, TrainingExpertParallelMoE
from shunter.train.objective import language_model_loss
from shunter.train.packing import (
    PackingRule,
    adamw_state_of,
    agreed_micro_op_times,
    gather_expert_state,
    micro_op_times,
    packing_bytes,
)
from shunter.train.trainer import (
    TrainConfig,
    Trainer,
    TrainResult,
    _bar,
    batch_at,
    check_not_past_end,
    check_resumable,
    learning_rate,
    make_optimizer,
    parameters,
)

DEFAULT_MICRO_OP_BYTES = 30_000_000  # Lina's default micro-op (30 MB)
DEFAULT_BUCKET_BYTES = 25 * 2**20  # DDP's default bucket_cap_mb
DEFAULT_TIMEOUT_S = 300.0
DEFAULT_A2A_CHUNKS = 1  # no chunking: one all-to-all per dispatch and per combine


@dataclass(frozen=True)
class ParallelOptions:
    """How a parallel run communicates; none of it changes the math, so all may change on resume.

    expert_parallel: ranks the experts are spread over (must equal the world size).
    comm: one of COMM_SCHEDULERS. micro_op_bytes: Lina's micro-op size ("lina").
    bucket_bytes: the allreduce buckets of "overlap" and "priority".
    a2a_chunks: chunks of each MoE layer's all-to-alls, pipelined with the expert FFN (1: none).
    placements: per MoE layer the plan's exclusive slots; None: contiguous blocks of experts.
    packing: Lina's expert packing (None: the experts stay as placed)."""

    expert_parallel: int
    comm: str = "overlap"
    micro_op_bytes: int = DEFAULT_MICRO_OP_BYTES
    bucket_bytes: int = DEFAULT_BUCKET_BYTES
    a2a_chunks: int = DEFAULT_A2A_CHUNKS
    placements: Sequence[ExpertSlots] | None = None
    plan_source: str = "plan"
    packing: PackingRule | None = None

    def validate(self, config: TrainConfig, world_size: int) -> None:
        self.check_values(config)
        self.check_world(config, world_size)

    def check_values(self, config: TrainConfig) -> None:
        """The checks that need no process group (run before joining one)."""
        if self.comm not in COMM_SCHEDULERS:
            raise FieldError("comm", f"{self.comm!r} is not one of {', '.join(COMM_SCHEDULERS)}")
        for name in ("micro_op_bytes", "bucket_bytes"):
            if getattr(self, name) <= 0:
                raise FieldError(name, f"must be a positive number of bytes, got {getattr(self, name)}")
        if self.a2a_chunks < 1:
            raise FieldError("a2a_chunks", f"must be at least 1 (1: no chunking), got {self.a2a_chunks}")
        if self.expert_parallel < 1:
            raise FieldError("expert_parallel", f"must be at least 1, got {self.expert_parallel}")
        if self.expert_parallel > config.num_experts:
            raise FieldError(
                "expert_parallel",
                f"{self.expert_parallel} ranks for {config.num_experts} experts: every expert-parallel rank "
                "must hold at least one expert (launch more ranks than experts with a smaller "
                "--expert-parallel: each group of that many ranks then holds every expert)",
            )
        if config.batch_size % self.expert_parallel:
            raise FieldError(
                "batch_size",
                f"{config.batch_size} sequences do not split evenly over {self.expert_parallel} ranks",
            )
        if self.placements is not None:
            self._check_placements(config, self.expert_parallel)
        if self.packing is not None:
            self.packing.validate(self.expert_parallel, self.placements is not None)

    def check_world(self, config: TrainConfig, world_size: int) -> None:
        if world_size % self.expert_parallel:
            raise FieldError(
                "expert_parallel",
                f"{self.expert_parallel} does not divide the {world_size} ranks launched into "
                "data-parallel replicas of the experts",
            )
        if config.batch_size % world_size:
            raise FieldError(
                "batch_size", f"{config.batch_size} sequences do not split evenly over {world_size} ranks"
            )

    def _check_placements(self, config: TrainConfig, world_size: int) -> None:
        assert self.placements is not None
        if len(self.placements) != config.num_layers:
            raise ShunterError(
                f"{self.plan_source}: the plan has {len(self.placements)} layers, "
                f"the model {config.num_layers}"
            )
        for layer, slots in enumerate(self.placements):
            if slots.num_devices != world_size:
                raise ShunterError(
                    f"{self.plan_source}: the plan is for {slots.num_devices} devices, but --expert-parallel "
                    f"is {world_size}"
                )
            if slots.num_experts != config.num_experts:
                raise ShunterError(
                    f"{self.plan_source}: layer {layer} places {slots.num_experts} experts, the model has "
                    f"{config.num_experts}"
                )
            if not slots.is_exclusive:
                raise ShunterError(
                    f"{self.plan_source}: layer {layer} replicates experts; training needs an exclusive "
                    "placement (make the plan without --replicate)"
                )

    def slots(self, layer: int, num_experts: int, world_size: int) -> ExpertSlots:
        if self.placements is not None:
            return self.placements[layer]
        return ExpertSlots.from_device_of_expert(contiguous_placement(num_experts, world_size), world_size)


@dataclass
class ExpertLayout:
    """Where this rank's experts are: expert_parallel ranks per group, its MoE blocks (each holding
    its trainable stacks), the all-to-alls' context and the replica group (None: no replicas)."""

    expert_parallel: int
    blocks: list[TrainingExpertParallelMoE]
    context: ExchangeContext
    replica_group: dist.ProcessGroup | None

    def expert_tensors(self) -> list[torch.Tensor]:
        return [t for block in self.blocks for t in (block.gate_up, block.down)]


# ---------------------------------------------------------------------------------------------
# the trainer


class ParallelTrainer(Trainer):
    """Trainer for one rank of an expert-parallel run (the process group already initialised).

    The work directory (tokenizer, token streams) is prepared by rank 0 before the others read it.
    Checkpoints: each rank writes `state-STEP.rankR.pt` (its dense copy, its experts, its optimizer
    state), then rank 0 names the step in `parallel.json` (written atomically after every rank has
    saved), and only then deletes older steps: a run killed at any point leaves the last named
    step loadable. Per-step timing goes to `steps.rankR.jsonl` in the work directory."""

    MANIFEST = "parallel.json"

    def __init__(
        self, config, corpus_root, out_dir, options: ParallelOptions, work_dir=None, **kwargs
    ) -> None:
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        config.validate()
        options.validate(config, self.world_size)
        self.options = options
        silent = kwargs.pop("log", None) if self.rank else None
        if self.rank != 0:
            kwargs["log"] = silent or (lambda _line: None)
        failure: list[str | None] = [None]
        if self.rank == 0:
            try:
                super().__init__(config, corpus_root, out_dir, work_dir, **kwargs)
            except ShunterError as exc:
                failure[0] = str(exc)
        dist.broadcast_object_list(failure, src=0)
        if failure[0] is not None:
            if self.rank == 0:
                raise ShunterError(failure[0])
            raise ShunterError("rank 0 could not prepare the run (its error names the cause)")
        if self.rank != 0:
            super().__init__(config, corpus_root, out_dir, work_dir, **kwargs)
        self.timing_path = self.work_dir / f"steps.rank{self.rank}.jsonl"

    def checkpoint_path(self) -> Path:
        return self.work_dir / self.MANIFEST

    def _state_file(self, step: int, rank: int) -> Path:
        return self.work_dir / f"state-{step}.rank{rank}.pt"

    def run(self, resume: bool = False, stop_after: int | None = None) -> TrainResult | None:
        config, options, n = self.config, self.options, self.world_size
        manifest_path = self.checkpoint_path()
        if manifest_path.is_file() and not resume:
            raise ShunterError(
                f"{manifest_path}: a checkpoint exists; pass --resume to continue it, "
                "or delete the work directory to start over"
            )
        weights = self.initial_weights()
        timeline = StepTimeline()
        # a resumed run continues with the layout its checkpoint was saved under (packing may have
        # changed it); its experts are then loaded into that layout's stacks
        self.expert_parallel = self._manifest()[1] if resume else options.expert_parallel
        layout = self._layout(weights, self.expert_parallel, timeline)
        for layer in weights.layers:  # this rank keeps only its own experts (in the layout's blocks)
            layer.moe.experts_gate_up = layer.moe.experts_down = None
        dense = parameters(weights, experts=False)
        experts = layout.expert_tensors()
        params = dense + experts
        optimizer = make_optimizer(config, params)
        gradient_group = dist.new_group(backend="gloo")

        def allreduce_ops(order: Sequence[int] | None) -> list[list[Segment]]:
            if options.comm == "lina":
                return micro_ops(dense, options.micro_op_bytes, order)
            return bucket_ops(dense, options.bucket_bytes, order)

        sync = GradientSync(dense, allreduce_ops(None), options.comm != "overlap", gradient_group, timeline)
        layout.context.sync = sync

        start_step, losses, train_seconds = 0, [], 0.0
        if resume:
            start_step, losses, train_seconds = self._load(params, optimizer)
        tokens_per_step = config.batch_size * config.seq_len
        per_rank = config.batch_size // n
        end = config.steps if stop_after is None else min(config.steps, start_step + stop_after)
        window_started, window_steps = time.perf_counter(), 0
        completed = start_step
        for step in range(start_step, end):
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(config, step)
            tokens = batch_at(self.train_stream, config, step)[
                self.rank * per_rank : (self.rank + 1) * per_rank
            ]
            timeline.clear()
            began = time.perf_counter()
            with self._autocast():
                share = per_rank / config.batch_size
                loss, cross_entropy, aux = language_model_loss(
                    weights, self.spec, tokens, config.aux_loss_coef, layout.blocks, share
                )
            forward_done = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            sync.begin_backward()
            try:
                loss.backward()
                backward_done = time.perf_counter()
                sync.finish()
            finally:
                sync.stop()
            for expert in experts:  # experts no token chose: zero, as their rows of the one-process
                if expert.grad is None:  # stacks (the optimizer still decays and moves them)
                    expert.grad = torch.zeros_like(expert)
            dense_synced = time.perf_counter()
            if layout.replica_group is not None:  # replicas of an expert sum their gradients
                for expert in experts:
                    dist.all_reduce(expert.grad, group=layout.replica_group)
            synced = time.perf_counter()
            if step == start_step:  # as DDP does: rebuild the ops in the order rank 0's gradients came
                order = [sync.ready_order]
                dist.broadcast_object_list(order, src=0)
                sync.use_ops(allreduce_ops(order[0]))
            global_ce, global_aux = self._clip_and_sum(dense, experts, cross_entropy, aux)
            optimizer.step()
            ended = time.perf_counter()
            completed = step + 1
            losses.append((step, global_ce, global_aux))
            times = (began, forward_done, backward_done, dense_synced, synced, ended)
            self._record_timing(step, times, timeline, losses[-1])
            if options.packing is not None and options.packing.due(completed) and completed < config.steps:
                packed = self._maybe_pack(completed, weights, layout, optimizer, dense, timeline)
                if packed is not None:
                    layout, optimizer = packed
                    layout.context.sync = sync
                    experts = layout.expert_tensors()
                    params = dense + experts
            window_steps += 1
            if self.rank == 0 and (completed % 10 == 0 or completed == config.steps):
                now = time.perf_counter()
                rate = window_steps * tokens_per_step / (now - window_started)
                train_seconds += now - window_started
                window_started, window_steps = now, 0
                recent = np.mean([ce for _, ce, _ in losses[-10:]])
                self.progress(
                    f"{_bar(completed / config.steps)} step {completed}/{config.steps}  loss {recent:.3f}  "
                    f"balance {global_aux:.3f}  {rate / 1000:.1f}k tok/s on {n} ranks ({options.comm})"
                )
            if completed % config.checkpoint_every == 0:
                self._save(params, optimizer, completed, losses, train_seconds)
        if completed != start_step or not manifest_path.is_file():
            self._save(params, optimizer, completed, losses, train_seconds)
        full = self._gather_experts(weights, layout.blocks)
        if completed < config.steps or self.rank != 0:
            return None
        assert full is not None
        heldout = self.evaluate(full)
        result = TrainResult(
            self.out_dir,
            config.steps,
            losses[-1][1],
            losses,
            train_seconds,
            config.steps * tokens_per_step,
            heldout,
        )
        self._export(full, result)
        return result

    def _layout(self, weights: ModelWeights, expert_parallel: int, timeline: StepTimeline) -> ExpertLayout:
        """This rank's MoE blocks with the experts spread over expert_parallel ranks, cut from the
        full expert stacks in `weights` (which the caller drops afterwards)."""
        expert_group, replica_group = self._groups(expert_parallel)
        context = ExchangeContext(expert_group, timeline)
        blocks = [
            TrainingExpertParallelMoE(
                self.spec,
                layer.moe,
                self.options.slots(i, self.config.num_experts, expert_parallel),
                context,
                expert_group,
                replica_group,
                self.options.a2a_chunks,
            )
            for i, layer in enumerate(weights.layers)
        ]
        return ExpertLayout(expert_parallel, blocks, context, replica_group)

    def _maybe_pack(self, completed, weights, layout, optimizer, dense, timeline):
        """Lina's packing decision after `completed` steps (the same on every rank): the new
        (layout, optimizer) if it packs, else None."""
        assert self.options.packing is not None
        ffn_s, a2a_s = agreed_micro_op_times(timeline)
        block = layout.blocks[0]
        config = self.config
        saved, added = packing_bytes(
            self.expert_parallel,
            self.world_size,
            config.num_layers,
            config.batch_size // self.world_size * config.seq_len * config.top_k,
            config.hidden_size * (2 if config.bf16_autocast else 4),
            config.num_experts,
            (block.gate_up[0].numel() + block.down[0].numel()) * block.gate_up.element_size(),
        )
        packed = self.options.packing.packed(self.expert_parallel, ffn_s, a2a_s, saved, added)
        measured = (
            f"step {completed}: an FFN micro-op takes {ffn_s * 1e3:.1f} ms, an all-to-all micro-op "
            f"{a2a_s * 1e3:.1f} ms; halving the expert-parallel ranks would save {saved / 1e6:.2f} MB "
            f"of all-to-all and add {added / 1e6:.2f} MB of expert allreduce a step per rank"
        )
        if packed == self.expert_parallel:
            if (
                self.expert_parallel % 2 == 0
                and self.expert_parallel // 2 >= self.options.packing.min_expert_parallel
            ):
                self.progress(f"{measured}: not packing")
            return None
        self.progress(
            f"{measured}: packing the experts, expert-parallel {self.expert_parallel} -> {packed} "
            f"({config.num_experts // packed} experts per rank)"
        )
        return self._pack(weights, layout, optimizer, dense, packed, timeline)

    def _pack(self, weights, layout, optimizer, dense, expert_parallel, timeline):
        """The one-time exchange of packing: every rank gathers every expert's weights and AdamW
        state, builds the blocks of the new layout and an optimizer whose state is the old one's
        (the dense tensors are the same objects; the expert stacks are cut from the gathered)."""
        full = gather_expert_state(layout.blocks, optimizer, self.config.num_experts)
        for layer, stacks in zip(weights.layers, full, strict=True):
            layer.moe.experts_gate_up, layer.moe.experts_down = stacks["gate_up"], stacks["down"]
        packed = self._layout(weights, expert_parallel, timeline)
        for layer in weights.layers:
            layer.moe.experts_gate_up = layer.moe.experts_down = None
        repacked = make_optimizer(self.config, dense + packed.expert_tensors())
        for p in dense:
            if p in optimizer.state:
                repacked.state[p] = optimizer.state[p]
        for block, stacks in zip(packed.blocks, full, strict=True):
            for name in ("gate_up", "down"):
                state = adamw_state_of(stacks, name, block.local_ids)
                if state:
                    repacked.state[getattr(block, name)] = state
        self.expert_parallel = expert_parallel
        return packed, repacked

    def _groups(self, expert_parallel: int) -> tuple[dist.ProcessGroup | None, dist.ProcessGroup | None]:
        """(this rank's expert-parallel group, its replica group). Ranks [d*P, (d+1)*P) form
        expert-parallel group d; the ranks at the same position of every group hold the same
        experts. With one group: (None, None), the default group. Every rank creates every group
        (new_group is collective)."""
        P, n = expert_parallel, self.world_size
        if n == P:
            return None, None
        expert_groups = [
            dist.new_group(list(range(d * P, (d + 1) * P)), backend="gloo") for d in range(n // P)
        ]
        replica_groups = [dist.new_group(list(range(p, n, P)), backend="gloo") for p in range(P)]
        return expert_groups[self.rank // P], replica_groups[self.rank % P]

    def _clip_and_sum(self, dense, experts, cross_entropy, aux) -> tuple[float, float]:
        """Clip by the global gradient norm (as clip_grad_norm_ over every parameter of the
        single-process model) and return the global batch's (cross-entropy, balance loss)."""
        dense_sq = sum(g.grad.float().pow(2).sum() for g in dense)  # the same on every rank
        local = torch.stack(
            [
                sum((e.grad.float().pow(2).sum() for e in experts if e.grad is not None), torch.zeros(())),
                cross_entropy.detach().float(),
                aux.detach().float(),
            ]
        )
        dist.all_reduce(local)
        replicas = self.world_size // self.expert_parallel  # each expert's gradient counted as often
        total_norm = (dense_sq + local[0] / replicas).sqrt()
        scale = torch.clamp(self.config.grad_clip / (total_norm + 1e-6), max=1.0)
        for p in dense + experts:
            if p.grad is not None:
                p.grad.mul_(scale)
        return float(local[1]), float(local[2])

    def _record_timing(self, step, times, timeline, loss) -> None:
        """times: perf_counter at (began, forward done, backward done, dense gradients summed,
        expert replicas summed, optimizer done)."""
        began, forward_done, backward_done, dense_synced, synced, ended = times
        a2a_fwd = union_length(timeline.a2a_forward)
        a2a_bwd = union_length(timeline.a2a_backward)
        ffn_s, a2a_s = micro_op_times(timeline)
        record = {
            "step": step,
            "rank": self.rank,
            "comm": self.options.comm,
            "expert_parallel": self.expert_parallel,
            "cross_entropy": loss[1],
            "balance": loss[2],
            "step_s": ended - began,
            "forward_s": forward_done - began,
            "backward_s": synced - forward_done,
            "forward_compute_s": forward_done - began - a2a_fwd,
            "backward_compute_s": backward_done - forward_done - a2a_bwd,
            "a2a_forward_s": a2a_fwd,
            "a2a_backward_s": a2a_bwd,
            "allreduce_s": union_length(timeline.allreduce),
            "allreduce_exposed_s": dense_synced - backward_done,
            "expert_allreduce_s": synced - dense_synced,
            "ffn_micro_op_s": ffn_s,
            "a2a_micro_op_s": a2a_s,
            "a2a_with_allreduce_s": overlap_length(timeline.a2a_backward, timeline.allreduce),
            "optimizer_s": ended - synced,
            # perf_counter is CLOCK_MONOTONIC, one clock for every process on a machine: the
            # ranks' steps line up on it (the emulated cluster's hosts share this machine)
            "began_s": began,
            "dispatch_rows": timeline.dispatch_rows,
            # seconds since the step began, for per-rank timeline plots
            "intervals": {
                "forward": [[0.0, forward_done - began]],
                "backward": [[forward_done - began, backward_done - began]],
                "a2a": [[a - began, b - began] for a, b in timeline.a2a_forward + timeline.a2a_backward],
                "allreduce": [[a - began, b - began] for a, b in sorted(timeline.allreduce)],
                "expert_allreduce": [[dense_synced - began, synced - began]],
                "optimizer": [[synced - began, ended - began]],
            },
        }
        with open(self.timing_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def _save(self, params, optimizer, step, losses, train_seconds) -> None:
        state = {
            "config": dataclasses.asdict(self.config),
            "world_size": self.world_size,
            "expert_parallel": self.expert_parallel,
            "step": step,
            "losses": losses,
            "params": [p.detach().clone() for p in params],
            "optimizer": optimizer.state_dict(),
            "train_seconds": train_seconds,
        }
        with atomic_output(self._state_file(step, self.rank), binary=True) as f:
            torch.save(state, f)
        dist.barrier()  # every rank's file of this step is complete
        if self.rank == 0:
            previous = self._manifest_step()
            with atomic_output(self.checkpoint_path()) as f:
                layout = {"world_size": self.world_size, "expert_parallel": self.expert_parallel}
                f.write(json.dumps({"step": step} | layout) + "\n")
            if previous is not None and previous != step:
                for rank in range(self.world_size):
                    self._state_file(previous, rank).unlink(missing_ok=True)
        dist.barrier()

    def _manifest_step(self) -> int | None:
        path = self.checkpoint_path()
        if not path.is_file():
            return None
        return int(json.loads(path.read_text())["step"])

    def _manifest(self) -> tuple[int, int]:
        """(step, expert-parallel degree) of the checkpoint to resume (one clear error if unusable);
        a manifest from before packing existed has no degree: the options' then."""
        path = self.checkpoint_path()
        try:
            manifest = json.loads(path.read_text())
            step, world_size = int(manifest["step"]), int(manifest["world_size"])
            expert_parallel = int(manifest.get("expert_parallel", self.options.expert_parallel))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ShunterError(f"{path}: not a parallel checkpoint manifest ({exc})") from None
        if world_size != self.world_size:
            raise ShunterError(
                f"{path}: the checkpoint was made by {world_size} ranks, this run has {self.world_size}; "
                f"resume with {world_size} ranks"
            )
        if expert_parallel < 1 or world_size % expert_parallel or expert_parallel > self.config.num_experts:
            raise ShunterError(f"{path}: expert_parallel {expert_parallel} does not fit {world_size} ranks")
        return step, expert_parallel

    def _load(self, params, optimizer) -> tuple[int, list, float]:
        path = self.checkpoint_path()
        step, _ = self._manifest()
        state_path = self._state_file(step, self.rank)
        if not state_path.is_file():
            raise ShunterError(f"{state_path}: missing; the checkpoint of step {step} is incomplete")
        state = torch.load(state_path, weights_only=False)
        check_resumable(state["config"], self.config, state_path, self.log)
        check_not_past_end(state["step"], self.config, state_path)
        with torch.no_grad():
            for p, saved in zip(params, state["params"], strict=True):
                p.copy_(saved)
        optimizer.load_state_dict(state["optimizer"])
        self.log(f"resumed at step {step} from {path} on {self.world_size} ranks")
        return state["step"], state["losses"], state["train_seconds"]

    def _gather_experts(self, weights: ModelWeights, blocks) -> ModelWeights | None:
        """Rank 0 gets every expert back into the full weights (for evaluation and export)."""
        mine = [(block.local_ids, block.gate_up.detach(), block.down.detach()) for block in blocks]
        everyone: list = [None] * self.world_size
        dist.all_gather_object(everyone, mine)
        if self.rank != 0:
            return None
        for i, layer in enumerate(weights.layers):
            E = self.config.num_experts
            _, first_gu, first_down = everyone[0][i]
            gate_up = first_gu.new_empty((E, *first_gu.shape[1:]))
            down = first_down.new_empty((E, *first_down.shape[1:]))
            for rank_blocks in everyone:
                ids, gu, dn = rank_blocks[i]
                gate_up[ids], down[ids] = gu, dn
            layer.moe.experts_gate_up, layer.moe.experts_down = gate_up, down
        for p in parameters(weights):
            p.requires_grad_(False)
        return weights
