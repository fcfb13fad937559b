"""How much a changed model (quantised, say) loses: held-out bits per byte of it and of the
reference, and the KL divergence of its next-token distribution from the reference's."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from shunter.model.executor import Batch, InMemoryModel
from shunter.model.tokenizer import Tokenizer


@dataclass(frozen=True)
class QualityReport:
    tokens_predicted: int
    text_bytes: int  # UTF-8 bytes of the evaluated text
    reference_bits_per_byte: float
    candidate_bits_per_byte: float
    kl_nats_per_token: float  # mean KL(reference || candidate) over predicted positions
    max_kl_nats: float  # the largest one position shows
    top1_agreement: float  # fraction of positions whose argmax the two share


@torch.inference_mode()
def compare_quality(
    reference: InMemoryModel,
    candidate: InMemoryModel,
    stream: torch.Tensor,
    tokenizer: Tokenizer,
    window: int = 256,
    batch: int = 4,
) -> QualityReport:
    """Both models on a token stream [n] cut into windows of `window` + 1 tokens (every token but
    each window's first is predicted once, as training's evaluation does): bits per byte of each
    over the stream's text, and the divergence of the candidate's distributions from the reference's."""
    starts = list(range(0, len(stream) - window, window)) or [0]
    nats = {"reference": 0.0, "candidate": 0.0}
    kl_sum, kl_max, agree, predicted = 0.0, 0.0, 0, 0
    for first in range(0, len(starts), batch):
        chunk = torch.stack([stream[s : s + window + 1] for s in starts[first : first + batch]])
        inputs, targets = chunk[:, :-1], chunk[:, 1:]
        B, T = inputs.shape
        forward = Batch(inputs, torch.arange(T).expand(B, T), torch.ones(B, T, dtype=torch.bool), 0)
        log_probs = {}
        for name, model in (("reference", reference), ("candidate", candidate)):
            log_probs[name] = model.forward(forward).float().log_softmax(-1)
            nats[name] += float(
                F.nll_loss(log_probs[name].reshape(B * T, -1), targets.reshape(-1), reduction="sum")
            )
        ref, cand = log_probs["reference"], log_probs["candidate"]
        kl = (ref.exp() * (ref - cand)).sum(-1)  # [B, T]
        kl_sum += float(kl.sum())
        kl_max = max(kl_max, float(kl.max()))
        agree += int((ref.argmax(-1) == cand.argmax(-1)).sum())
        predicted += B * T
    used = stream[: starts[-1] + window + 1].tolist()
    text_bytes = len(tokenizer.decode(used).encode("utf-8"))
    bits = {name: value / math.log(2) / text_bytes for name, value in nats.items()}
    return QualityReport(
        predicted,
        text_bytes,
        bits["reference"],
        bits["candidate"],
        kl_sum / predicted,
        kl_max,
        agree / predicted,
    )


def builtin_heldout_stream(tokenizer: Tokenizer, max_tokens: int) -> torch.Tensor:
    """The first `max_tokens` tokens of the built-in model's held-out text: the standard-library
    files training held out (shunter.train.corpus), tokenised as training tokenised them."""
    from shunter.train.corpus import Corpus, stdlib_dir, token_stream
    from shunter.train.trainer import TrainConfig

    corpus = Corpus.from_path(stdlib_dir(), TrainConfig.heldout_percent)
    stream, files = [], corpus.heldout_files
    for file in files:  # tokenise only as many files as the budget needs
        text = file.read_text(encoding="utf-8", errors="replace")
        if not text.strip():  # training skips blank files too
            continue
        stream.append(token_stream(tokenizer, [text]))
        if sum(len(s) for s in stream) >= max_tokens:
            break
    return torch.from_numpy(np.concatenate(stream)[:max_tokens].astype(np.int64))
