"""Training objective over explicit weights: next-token cross-entropy plus a load-balancing loss.

The forward is the runtime's own `decoder_layer`: training and inference share one copy of the math.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from shunter.model.executor import decoder_layer
from shunter.model.layers import MoEResult, Rotary, rms_norm, rope_inverse_frequencies
from shunter.model.spec import ModelSpec
from shunter.model.weights import ModelWeights


def load_balancing_loss(scores: torch.Tensor, expert_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Switch-Transformer balance loss E * sum_e f_e * P_e for one layer.

    scores [N, E] router probabilities; expert_ids [N, k]. f_e: share of the N*k choices that went to
    expert e (no gradient); P_e: mean router probability of e. Equals 1 when routing is uniform.
    """
    counts = torch.bincount(expert_ids.reshape(-1), minlength=num_experts).float()
    share = counts / counts.sum()
    return num_experts * (share * scores.mean(dim=0)).sum()


def load_balancing_loss_part(
    scores: torch.Tensor, global_counts: torch.Tensor, global_tokens: int, num_experts: int
) -> torch.Tensor:
    """One rank's part of `load_balancing_loss` over a batch split among ranks: the parts of all
    ranks sum to the loss of the whole batch. scores [N_r, E] this rank's router probabilities;
    global_counts [E] choices of each expert over every rank; global_tokens: tokens over every rank.
    E * sum_e f_e * P_e with P_e = sum over ranks of this rank's scores summed / global_tokens."""
    share = global_counts.float() / global_counts.sum()
    return num_experts * (share * scores.sum(dim=0) / global_tokens).sum()


# An expert-parallel MoE layer for training: x [N, H] -> (output [N, H], this rank's part of the
# layer's load-balancing loss, see load_balancing_loss_part).
TrainingMoE = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def language_model_loss(
    weights: ModelWeights,
    spec: ModelSpec,
    tokens: torch.Tensor,
    aux_loss_coef: float,
    moe_layers: Sequence[TrainingMoE] | None = None,
    batch_share: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """tokens [B, T+1] -> (total loss, cross-entropy in nats/token, mean balance loss).

    Data-parallel training passes this rank's sequences, its share of the global batch
    (batch_share = B / global B) and `moe_layers`, the expert-parallel blocks replacing each
    layer's `moe_block`. The three values are then this rank's parts: summed over the ranks they are
    the values of the global batch, and so are the gradients (the cross-entropy is scaled by
    batch_share; the balance loss uses every rank's routing counts)."""
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    B, T = inputs.shape
    inv_freq, factor = rope_inverse_frequencies(spec)
    rotary = Rotary.at(torch.arange(T).expand(B, T), inv_freq, spec.rope_interleaved, torch.float32, factor)
    balance: list[torch.Tensor] = []

    def observe(_layer: int, moe: MoEResult) -> None:
        balance.append(load_balancing_loss(moe.scores, moe.expert_ids, spec.num_experts))

    def override(block: TrainingMoE) -> Callable[[torch.Tensor], torch.Tensor]:
        def run(x: torch.Tensor) -> torch.Tensor:
            output, balance_part = block(x)
            balance.append(balance_part)
            return output

        return run

    h = F.embedding(inputs, weights.embed)
    for i, layer in enumerate(weights.layers):
        moe_override = None if moe_layers is None else override(moe_layers[i])
        h = decoder_layer(h, layer, spec, i, rotary, None, None, observe, moe_override=moe_override)
    logits = F.linear(rms_norm(h, weights.final_norm, spec.rms_norm_eps), weights.lm_head)
    cross_entropy = F.cross_entropy(logits.reshape(B * T, -1), targets.reshape(-1)) * batch_share
    aux = torch.stack(balance).mean() if balance else torch.zeros(())
    return cross_entropy + aux_loss_coef * aux, cross_entropy, aux


@torch.no_grad()
def total_nats(
    weights: ModelWeights, spec: ModelSpec, stream: torch.Tensor, window: int, batch: int = 16
) -> tuple[float, int]:
    """Sum of -ln p(token) over a token stream [n], predicted in windows of `window` tokens that
    overlap by one (every token but the first is predicted once). Returns (nats, tokens predicted)."""
    starts = list(range(0, len(stream) - 1, window))
    nats, count = 0.0, 0
    full = [s for s in starts if s + window + 1 <= len(stream)]
    groups = [full[i : i + batch] for i in range(0, len(full), batch)] + [
        [s] for s in starts if s not in full
    ]
    for group in groups:
        chunk = torch.stack([stream[s : s + window + 1] for s in group])
        _, cross_entropy, _ = language_model_loss(weights, spec, chunk, 0.0)
        predicted = chunk.shape[0] * (chunk.shape[1] - 1)
        nats += float(cross_entropy) * predicted
        count += predicted
    return nats, count


def bits_per_byte(nats: float, num_bytes: int) -> float:
    return nats / math.log(2) / num_bytes
