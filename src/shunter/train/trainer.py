"""Single-process MoE training: AdamW, warmup + cosine schedule, checkpoints, exact resume, export.

One room: the parallel trainer (train.parallel) subclasses this one and reuses each of these
pieces, so they stay together as the single-process reference it is tested against.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shunter.errors import FieldError, ShunterError
from shunter.files import atomic_output
from shunter.model.export import check_replaceable, mixtral_config, random_weights, save_checkpoint
from shunter.model.spec import ModelSpec, spec_from_config
from shunter.model.tokenizer import END_OF_TEXT, Tokenizer, train_byte_level_bpe
from shunter.model.weights import ModelWeights
from shunter.train.corpus import Corpus, read_texts, token_stream
from shunter.train.objective import bits_per_byte, language_model_loss, total_nats
from shunter.units import SEED_LIMIT

# a resumed run may be lengthened or shortened, or checkpoint at another interval; nothing else
RESUMABLE_CHANGES = ("steps", "checkpoint_every")


MIN_VOCAB_SIZE = 257  # byte-level BPE: 256 byte tokens and END_OF_TEXT before any merge
# (field, minimum, strictly above the minimum) of the float settings
FLOAT_LIMITS = (
    ("lr", 0.0, True),
    ("min_lr_ratio", 0.0, False),
    ("weight_decay", 0.0, False),
    ("grad_clip", 0.0, True),
    ("aux_loss_coef", 0.0, False),
)


@dataclass(frozen=True)
class TrainConfig:
    """A Mixtral-layout model and how to train it. Sizes are element counts; lr per step."""

    vocab_size: int = 4096
    hidden_size: int = 256
    num_layers: int = 6
    num_heads: int = 8
    num_kv_heads: int = 4
    num_experts: int = 8
    top_k: int = 2
    expert_intermediate_size: int = 256
    max_position_embeddings: int = 1024
    tie_word_embeddings: bool = True
    seq_len: int = 256
    batch_size: int = 16
    steps: int = 3000
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    aux_loss_coef: float = 0.01
    seed: int = 0
    checkpoint_every: int = 200
    heldout_percent: int = 5
    save_dtype: str = "bfloat16"
    bf16_autocast: bool = (
        True  # matmuls in bf16 (about 2x faster on CPUs with AVX512-BF16), fp32 master weights
    )

    def validate(self) -> None:
        positive = (
            "vocab_size",
            "hidden_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "num_experts",
            "top_k",
            "expert_intermediate_size",
            "seq_len",
            "batch_size",
            "steps",
            "checkpoint_every",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise FieldError(name, f"must be at least 1, got {getattr(self, name)}")
        if self.vocab_size < MIN_VOCAB_SIZE:
            raise FieldError(
                "vocab_size",
                f"must be at least {MIN_VOCAB_SIZE} (the 256 bytes of the byte-level tokenizer and its "
                f"end-of-text token), got {self.vocab_size}",
            )
        for name, minimum, above in FLOAT_LIMITS:
            value = getattr(self, name)
            if not math.isfinite(value) or value < minimum or (above and value <= minimum):
                bound = f"greater than {minimum:g}" if above else f"at least {minimum:g}"
                raise FieldError(name, f"must be a finite number {bound}, got {value!r}")
        if self.min_lr_ratio > 1:
            raise FieldError("min_lr_ratio", f"must be at most 1, got {self.min_lr_ratio!r}")
        if not self.warmup_steps >= 0:
            raise FieldError("warmup_steps", f"must not be negative, got {self.warmup_steps}")
        if not 0 < self.heldout_percent < 100:
            raise FieldError("heldout_percent", f"must lie in 1..99, got {self.heldout_percent}")
        if not 0 <= self.seed < SEED_LIMIT:
            raise FieldError("seed", f"must lie in [0, 2^63), got {self.seed}")
        if self.top_k > self.num_experts:
            raise FieldError(
                "top_k", f"{self.top_k} is greater than the number of experts ({self.num_experts})"
            )
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise FieldError(
                "hidden_size",
                "must divide by num_heads (and num_heads by num_kv_heads)",
                str(self.hidden_size),
            )
        if self.seq_len > self.max_position_embeddings:
            raise FieldError("seq_len", f"exceeds max_position_embeddings ({self.max_position_embeddings})")
        if self.save_dtype not in ("float32", "bfloat16", "float16"):
            raise FieldError("save_dtype", f"{self.save_dtype!r} is not float32, bfloat16 or float16")

    def model_config(self, eos_token_id: int) -> dict[str, Any]:
        return mixtral_config(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            num_layers=self.num_layers,
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            num_experts=self.num_experts,
            top_k=self.top_k,
            intermediate_size=self.expert_intermediate_size,
            max_position_embeddings=self.max_position_embeddings,
            dtype=self.save_dtype,
            eos_token_id=eos_token_id,
            tie_word_embeddings=self.tie_word_embeddings,
        )


def learning_rate(config: TrainConfig, step: int) -> float:
    """Linear warmup to lr, then cosine decay to min_lr_ratio * lr at the last step."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(config.steps - config.warmup_steps, 1)
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return config.lr * (config.min_lr_ratio + (1 - config.min_lr_ratio) * cosine)


def batch_at(stream: torch.Tensor, config: TrainConfig, step: int) -> torch.Tensor:
    """The training batch of `step`: [batch_size, seq_len + 1] windows at positions drawn from a
    generator seeded by (seed, step), so a resumed run sees exactly the batches it would have."""
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
    starts = torch.randint(0, len(stream) - config.seq_len - 1, (config.batch_size,), generator=generator)
    return torch.stack([stream[s : s + config.seq_len + 1] for s in starts.tolist()]).long()


def parameters(weights: ModelWeights, experts: bool = True) -> list[torch.Tensor]:
    """Every trainable tensor once, in a fixed order (tied embeddings appear once); without
    `experts`, only the dense ones (what every expert-parallel rank holds a copy of)."""
    tensors = [weights.embed, weights.final_norm]
    if weights.lm_head is not weights.embed:
        tensors.append(weights.lm_head)
    for layer in weights.layers:
        a, moe = layer.attention, layer.moe
        tensors += [layer.attn_norm, layer.mlp_norm, a.q, a.k, a.v, a.o, moe.router]
        if experts:
            tensors += [moe.experts_gate_up, moe.experts_down]
    return tensors


def make_optimizer(config: TrainConfig, params: list[torch.Tensor]) -> torch.optim.AdamW:
    """AdamW over params (made trainable here); matrices decay, vectors do not."""
    for p in params:
        p.requires_grad_(True)
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": config.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=config.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
    )


def check_resumable(saved_config: dict[str, Any], config: TrainConfig, state_path: Path, log) -> None:
    """A checkpoint continues only under the configuration it was made with (RESUMABLE_CHANGES aside)."""
    saved = {k: v for k, v in saved_config.items() if k not in RESUMABLE_CHANGES}
    current = {k: v for k, v in dataclasses.asdict(config).items() if k not in RESUMABLE_CHANGES}
    if saved != current:
        changed = sorted(k for k in current if saved.get(k) != current[k])
        raise ShunterError(
            f"{state_path}: checkpoint was made with a different configuration "
            f"({', '.join(changed)}); "
            f"only {', '.join(RESUMABLE_CHANGES)} may change on --resume"
        )
    if saved_config["steps"] != config.steps:
        log(
            f"--steps changed from {saved_config['steps']} to {config.steps}: the cosine "
            "schedule is stretched from here on, so this run is not bit-identical to either"
        )


def check_not_past_end(step: int, config: TrainConfig, state_path: Path) -> None:
    if step > config.steps:
        raise ShunterError(
            f"{state_path}: the checkpoint is at step {step}, past --steps {config.steps}; "
            f"pass --steps {step} or more"
        )


@dataclass
class TrainResult:
    out_dir: Path
    steps: int
    final_loss: float
    losses: list[tuple[int, float, float]]  # (step, cross-entropy, balance loss)
    train_seconds: float
    tokens_seen: int
    heldout: dict[str, float]


class Trainer:
    """Owns the work directory: tokenizer, token streams, and the resumable state file."""

    STATE = "state.pt"

    def __init__(
        self,
        config: TrainConfig,
        corpus_root: Path,
        out_dir: Path,
        work_dir: Path | None = None,
        log: Callable[[str], None] | None = None,
        overwrite: bool = False,
        resume: bool = False,
    ) -> None:
        config.validate()
        self.config, self.out_dir = config, Path(os.path.abspath(out_dir))
        self.overwrite = overwrite
        self.work_dir = Path(work_dir) if work_dir else self.out_dir.with_name(self.out_dir.name + ".work")
        self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        self.progress = log or _progress_to_stderr
        _check_writable(self.out_dir)
        check_replaceable(self.out_dir, overwrite)
        if resume and not self.checkpoint_path().is_file():  # before the work directory is made
            state = self.checkpoint_path()
            raise ShunterError(f"{state}: no checkpoint to resume; run without --resume to start training")
        self.corpus = Corpus.from_path(Path(corpus_root), config.heldout_percent)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.tokenizer = self._tokenizer()
        self.eot = self.tokenizer.token_id(END_OF_TEXT)
        self.spec: ModelSpec = spec_from_config(config.model_config(self.eot), source="training config")
        self.train_stream = self._stream("train", self.corpus.train_files)
        self.heldout_stream = self._stream("heldout", self.corpus.heldout_files)
        if len(self.train_stream) <= config.seq_len + 1:
            raise ShunterError(
                f"{corpus_root}: corpus too small ({len(self.train_stream)} tokens) for "
                f"--seq-len {config.seq_len}"
            )

    def checkpoint_path(self) -> Path:
        """The file whose presence means a run can be resumed."""
        return self.work_dir / self.STATE

    def initial_weights(self) -> ModelWeights:
        """The weights at step 0: the same on every run (and every rank) of one seed."""
        return random_weights(self.spec, self.config.seed, std=0.02, router_std=0.02)

    def _tokenizer(self) -> Tokenizer:
        path = self.work_dir / "tokenizer.json"
        if not path.is_file():
            self.log(
                f"training a {self.config.vocab_size}-token BPE tokenizer on "
                f"{len(self.corpus.train_files)} files ..."
            )
            tmp = path.with_suffix(".tmp")
            train_byte_level_bpe(read_texts(self.corpus.train_files), self.config.vocab_size, tmp)
            os.replace(tmp, path)
        return Tokenizer(path)

    def _stream(self, name: str, files: list[Path]) -> torch.Tensor:
        path = self.work_dir / f"{name}-tokens.npy"
        if not path.is_file():
            stream = token_stream(self.tokenizer, read_texts(files))
            with atomic_output(path, binary=True) as f:
                np.save(f, stream)
        return torch.from_numpy(np.load(path).astype(np.int64))

    def run(self, resume: bool = False, stop_after: int | None = None) -> TrainResult | None:
        """Train to config.steps (or stop after `stop_after` steps, for tests), then export.
        Returns None when stopped early; the state file then holds everything needed to resume."""
        config = self.config
        weights = self.initial_weights()
        params = parameters(weights)
        optimizer = make_optimizer(config, params)
        start_step, losses, train_seconds = 0, [], 0.0
        state_path = self.work_dir / self.STATE
        if resume and not state_path.is_file():
            raise ShunterError(
                f"{state_path}: no checkpoint to resume; run without --resume to start training"
            )
        if state_path.is_file():
            if not resume:
                raise ShunterError(
                    f"{state_path}: a checkpoint exists; pass --resume to continue it, "
                    "or delete the work directory to start over"
                )
            state = torch.load(state_path, weights_only=False)
            check_resumable(state["config"], config, state_path, self.log)
            with torch.no_grad():
                for p, saved in zip(params, state["params"], strict=True):
                    p.copy_(saved)
            optimizer.load_state_dict(state["optimizer"])
            start_step, losses, train_seconds = state["step"], state["losses"], state["train_seconds"]
            check_not_past_end(start_step, config, state_path)
            self.log(f"resumed at step {start_step} from {state_path}")

        tokens_per_step = config.batch_size * config.seq_len
        window_started, window_steps = time.perf_counter(), 0
        end = config.steps if stop_after is None else min(config.steps, start_step + stop_after)
        completed = start_step
        last_saved = start_step if resume else None
        try:
            for step in range(start_step, end):
                for group in optimizer.param_groups:
                    group["lr"] = learning_rate(config, step)
                with self._autocast():
                    loss, cross_entropy, aux = language_model_loss(
                        weights, self.spec, batch_at(self.train_stream, config, step), config.aux_loss_coef
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
                optimizer.step()
                completed = step + 1
                losses.append((step, cross_entropy.item(), aux.item()))
                window_steps += 1
                if completed % 10 == 0 or completed == config.steps:
                    now = time.perf_counter()
                    rate = window_steps * tokens_per_step / (now - window_started)
                    train_seconds += now - window_started
                    window_started, window_steps = now, 0
                    eta_min = (config.steps - completed) * tokens_per_step / max(rate, 1e-9) / 60
                    recent = np.mean([ce for _, ce, _ in losses[-10:]])
                    self.progress(
                        f"{_bar(completed / config.steps)} step {completed}/{config.steps}  "
                        f"loss {recent:.3f}  balance {aux.item():.3f}  "
                        f"lr {learning_rate(config, step):.2e}  {rate / 1000:.1f}k tok/s  "
                        f"eta {eta_min:.0f} min"
                    )
                if completed % config.checkpoint_every == 0:
                    self._save_state(params, optimizer, completed, losses, train_seconds)
                    last_saved = completed
        except KeyboardInterrupt:
            # an interrupted optimizer step may have left weights half-updated: keep the last checkpoint
            if last_saved is not None:
                advice = f"the checkpoint in {state_path} is at step {last_saved}; rerun with --resume"
            else:
                advice = "nothing was saved yet (no checkpoint); rerun to start over"
            raise ShunterError(f"interrupted at step {completed}; {advice}") from None
        # the final state is kept too, so a finished run can be resumed with more --steps
        if completed != start_step or not state_path.is_file():
            self._save_state(params, optimizer, completed, losses, train_seconds)
        if completed < config.steps:
            return None

        heldout = self.evaluate(weights)
        result = TrainResult(
            self.out_dir,
            config.steps,
            losses[-1][1],
            losses,
            train_seconds,
            config.steps * tokens_per_step,
            heldout,
        )
        self._export(weights, result)
        return result

    def evaluate(self, weights: ModelWeights) -> dict[str, float]:
        """Held-out cross-entropy in bits per byte, beside a unigram model of the training tokens."""
        stream = self.heldout_stream
        with self._autocast():
            nats, predicted = total_nats(weights, self.spec, stream, self.config.seq_len)
        num_bytes = len(self.tokenizer.decode(stream.tolist()).encode("utf-8"))
        counts = torch.bincount(self.train_stream, minlength=self.spec.vocab_size).double() + 1.0  # add-one
        unigram_nats = float(-(counts / counts.sum()).log()[stream[1:]].sum())
        return {
            "heldout_tokens": float(predicted),
            "heldout_bytes": float(num_bytes),
            "model_bits_per_byte": bits_per_byte(nats, num_bytes),
            "unigram_bits_per_byte": bits_per_byte(unigram_nats, num_bytes),
            "model_nats_per_token": nats / predicted,
        }

    def _autocast(self):
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.config.bf16_autocast)

    def _save_state(self, params, optimizer, step, losses, train_seconds) -> None:
        state = {
            "config": dataclasses.asdict(self.config),
            "step": step,
            "losses": losses,
            "params": [p.detach().clone() for p in params],
            "optimizer": optimizer.state_dict(),
            "train_seconds": train_seconds,
        }
        with atomic_output(self.work_dir / self.STATE, binary=True) as f:
            torch.save(state, f)

    def _export(self, weights: ModelWeights, result: TrainResult) -> None:
        summary = {
            "config": dataclasses.asdict(self.config),
            "steps": result.steps,
            "tokens_seen": result.tokens_seen,
            "train_seconds": result.train_seconds,
            "final_train_loss_nats": result.final_loss,
            "heldout": result.heldout,
            "corpus": {
                "root": str(self.corpus.root),
                "train_files": len(self.corpus.train_files),
                "heldout_files": len(self.corpus.heldout_files),
                "train_tokens": len(self.train_stream),
                "heldout_tokens": len(self.heldout_stream),
            },
            "loss_curve": [(s, round(ce, 4)) for s, ce, _ in result.losses[9::10]],
        }
        save_checkpoint(
            self.spec_config(),
            weights,
            self.out_dir,
            tokenizer_json=self.tokenizer.path,
            extra_files={"training.json": json.dumps(summary, indent=1) + "\n"},
            overwrite=self.overwrite,
        )

    def spec_config(self) -> dict[str, Any]:
        return self.config.model_config(self.eot)


def _bar(fraction: float, width: int = 20) -> str:
    filled = round(fraction * width)
    return "[" + "#" * filled + "." * (width - filled) + f"] {fraction:4.0%}"


def _progress_to_stderr(line: str) -> None:
    """On a terminal the progress line rewrites itself; in a log file each update is a line."""
    if sys.stderr.isatty():
        sys.stderr.write("\r" + line + "\x1b[K")
        if line.startswith("[" + "#" * 20):
            sys.stderr.write("\n")
    else:
        sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _check_writable(out_dir: Path) -> None:
    """Fail before any work if the output cannot be written."""
    probe = out_dir.parent
    while not probe.exists():
        probe = probe.parent
    writable = probe.is_dir() and os.access(probe, os.W_OK)
    if not writable or (out_dir.exists() and not (out_dir.is_dir() and os.access(out_dir, os.W_OK))):
        raise ShunterError(f"{out_dir}: not a writable directory (checked {probe})")
