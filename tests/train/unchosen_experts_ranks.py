"""Run by torchrun from tests/train/test_parallel.py: two stacked expert-parallel MoE layers for
training on 2 ranks, where the router never picks rank 1's experts in the second layer (their
router rows are strongly negative against positive inputs). Each rank writes its slice's
gradients of the input and of its experts to OUT/grads.rankR.pt for the test to compare with
one process running both layers on the whole batch. With CHUNKS > 1 the layers run their
all-to-alls in that many chunks pipelined with the expert FFN (with 6 tokens of 2 choices per rank,
some chunks are empty on some ranks).

usage: torchrun --nproc-per-node 2 -m tests.train.unchosen_experts_ranks OUT [CHUNKS]"""

from __future__ import annotations

import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from shunter.model.export import random_weights
from shunter.model.spec import spec_from_config
from shunter.plan.slots import ExpertSlots
from shunter.train.comm import StepTimeline
from shunter.train.expert_parallel import ExchangeContext, TrainingExpertParallelMoE
from shunter.train.trainer import TrainConfig

CONFIG = TrainConfig(
    vocab_size=64,
    hidden_size=16,
    num_layers=2,
    num_heads=2,
    num_kv_heads=1,
    num_experts=4,
    top_k=2,
    expert_intermediate_size=8,
    max_position_embeddings=16,
    seq_len=8,
    batch_size=2,
)
TOKENS_PER_RANK = 6


def setup() -> tuple:
    """(spec, the two layers' MoE weights, inputs [2 * TOKENS_PER_RANK, H] all positive); the
    second layer's router sends every token to experts 0 and 1 (rank 0's)."""
    spec = spec_from_config(CONFIG.model_config(eos_token_id=0), source="test config")
    weights = random_weights(spec, seed=3, std=0.5)  # gradients well above the comparison's atol
    moes = [layer.moe for layer in weights.layers]
    with torch.no_grad():
        router = moes[1].router
        router[:2] = router[:2].abs() + 0.5
        router[2:] = -(router[2:].abs() + 0.5)
    x = torch.rand(2 * TOKENS_PER_RANK, CONFIG.hidden_size, generator=torch.Generator().manual_seed(0)) + 0.1
    return spec, moes, x


def loss_of(output: torch.Tensor, rows: slice) -> torch.Tensor:
    """A loss whose gradient in output is a fixed random tensor (rows of it for a rank's slice):
    gradients of every weight are then of order one, so the comparison tells them apart from 0."""
    probe = torch.randn(2 * TOKENS_PER_RANK, CONFIG.hidden_size, generator=torch.Generator().manual_seed(1))
    return (output * probe[rows]).sum()


def main(out: Path, a2a_chunks: int) -> None:
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank = dist.get_rank()
    spec, moes, x = setup()
    context = ExchangeContext(None, StepTimeline())
    slots = ExpertSlots.from_device_of_expert([0, 0, 1, 1], 2)
    layers = [TrainingExpertParallelMoE(spec, moe, slots, context, a2a_chunks=a2a_chunks) for moe in moes]
    for layer in layers:
        layer.gate_up.requires_grad_(True)
        layer.down.requires_grad_(True)
    rows = slice(rank * TOKENS_PER_RANK, (rank + 1) * TOKENS_PER_RANK)
    mine = x[rows].clone().requires_grad_(True)
    hidden, _ = layers[0](mine)
    output, _ = layers[1](hidden.abs() + 0.1)  # positive, so the second router's choice holds
    loss_of(output, rows).backward()
    grads = {"x": mine.grad}
    for i, layer in enumerate(layers):
        grads[f"layer{i}.experts"] = layer.local_ids
        grads[f"layer{i}.gate_up"] = layer.gate_up.grad
        grads[f"layer{i}.down"] = layer.down.grad
    torch.save(grads, out / f"grads.rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 1)
