"""RoutingTrace: expert choices [layers, tokens, k] with gate weights, and its one file format (.npz)."""

from __future__ import annotations

import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from shunter.errors import ShunterError
from shunter.files import atomic_output
from shunter.units import format_bytes

if TYPE_CHECKING:
    from shunter.model.spec import ModelSpec

FORMAT_VERSION = 1
# far above any model's experts per layer (DeepSeek-V3: 256); E^2 statistics must fit in memory
MAX_EXPERTS = 4096


@dataclass
class RoutingTrace:
    """Which experts each token chose at each MoE layer.

    expert_ids [L, N, k] int: L MoE layers, N tokens (the same tokens, in the same order, at every
    layer), k choices per token, highest gate first. gate_weights [L, N, k] float32.
    layer_indices [L]: the model layer each row of the trace belongs to.
    """

    expert_ids: np.ndarray
    gate_weights: np.ndarray
    num_experts: int
    layer_indices: np.ndarray
    model: str = ""
    source: str = ""
    token_ids: np.ndarray | None = None  # [N] the token at each position, when known

    def __post_init__(self) -> None:
        self.expert_ids = np.asarray(self.expert_ids)
        self.gate_weights = np.asarray(self.gate_weights, dtype=np.float32)
        self.layer_indices = np.asarray(self.layer_indices, dtype=np.int64)
        self.validate()

    @property
    def num_layers(self) -> int:
        return int(self.expert_ids.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.expert_ids.shape[1])

    @property
    def top_k(self) -> int:
        return int(self.expert_ids.shape[2])

    def validate(self, source: str = "trace") -> None:
        ids = self.expert_ids
        if ids.ndim != 3:
            raise ShunterError(
                f"{source}: expert_ids must be [layers, tokens, k], got shape {list(ids.shape)}"
            )
        if not np.issubdtype(ids.dtype, np.integer):
            raise ShunterError(f"{source}: expert_ids must be integers, got {ids.dtype}")
        if self.gate_weights.shape != ids.shape:
            raise ShunterError(
                f"{source}: gate_weights shape {list(self.gate_weights.shape)} differs from "
                f"expert_ids shape {list(ids.shape)}"
            )
        if 0 in ids.shape:
            raise ShunterError(
                f"{source}: an empty trace ({ids.shape[0]} layers, {ids.shape[1]} tokens, "
                f"top-{ids.shape[2]}); a trace needs at least one layer, one token and one choice per token"
            )
        if self.num_experts <= 0:
            raise ShunterError(f"{source}: num_experts must be positive, got {self.num_experts}")
        if self.num_experts > MAX_EXPERTS:
            raise ShunterError(
                f"{source}: num_experts is {self.num_experts}, more than the {MAX_EXPERTS} a trace may have "
                f"(per-layer expert-to-expert statistics would need {format_bytes(8 * self.num_experts**2)})"
            )
        if self.top_k > self.num_experts:
            raise ShunterError(f"{source}: top-{self.top_k} of only {self.num_experts} experts")
        if ids.size and (ids.min() < 0 or ids.max() >= self.num_experts):
            raise ShunterError(
                f"{source}: expert_ids must lie in [0, {self.num_experts}), "
                f"found {int(ids.min())}..{int(ids.max())}"
            )
        if not np.all(np.isfinite(self.gate_weights)):
            raise ShunterError(f"{source}: gate_weights holds NaN or infinite values")
        if self.layer_indices.shape != (ids.shape[0],) or not np.issubdtype(
            self.layer_indices.dtype, np.integer
        ):
            raise ShunterError(f"{source}: layer_indices must have one entry per layer ({ids.shape[0]})")
        if self.token_ids is not None and len(self.token_ids) != ids.shape[1]:
            raise ShunterError(
                f"{source}: token_ids has {len(self.token_ids)} entries for {ids.shape[1]} tokens"
            )

    def check_fits(self, spec: ModelSpec, source: str = "trace") -> None:
        """ShunterError unless this trace was recorded on a model of `spec`'s shape: as many MoE
        layers, experts per layer and choices per token (an engine indexes its layers by it)."""
        expected = (spec.num_moe_layers, spec.num_experts, spec.top_k)
        found = (self.num_layers, self.num_experts, self.top_k)
        if found != expected:
            raise ShunterError(
                f"{source}: the trace has {found[0]} MoE layers x {found[1]} experts, top-{found[2]}; "
                f"the model {spec.name or ''} has {expected[0]} x {expected[1]}, top-{expected[2]}"
            )

    def save(self, path: str | Path) -> None:
        """Write atomically: a reader never sees a half-written file."""
        path = Path(path)
        arrays = {
            "format_version": np.int64(FORMAT_VERSION),
            "expert_ids": self.expert_ids.astype(np.int32),
            "gate_weights": self.gate_weights.astype(np.float32),
            "num_experts": np.int64(self.num_experts),
            "layer_indices": self.layer_indices,
            "model": np.str_(self.model),
            "source": np.str_(self.source),
        }
        if self.token_ids is not None:
            arrays["token_ids"] = np.asarray(self.token_ids, dtype=np.int64)
        with atomic_output(path, binary=True) as f:
            np.savez_compressed(f, **arrays)


def load_trace(path: str | Path) -> RoutingTrace:
    """Read a trace file; errors name the file and the field."""
    path = Path(path)
    if not path.is_file():
        raise ShunterError(f"{path}: trace file not found")
    not_a_trace = f"{path}: not a routing trace (an .npz written by `shunter trace`)"
    if path.stat().st_size == 0:
        raise ShunterError(f"{not_a_trace}: the file is empty")
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.ndarray):  # a single .npy array, not an archive of named fields
            raise ShunterError(f"{not_a_trace}: it holds a single .npy array")
        with loaded as data:
            fields = dict(data.items())
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        # numpy's "pickled data" message would send a user to allow_pickle; a trace never needs it
        detail = "not an .npz archive" if "pickle" in str(exc) else str(exc)
        raise ShunterError(f"{not_a_trace}: {detail}") from None
    for key in ("expert_ids", "gate_weights", "num_experts"):
        if key not in fields:
            raise ShunterError(f"{path}: field {key!r} is missing")
    ids, weights, experts = fields["expert_ids"], fields["gate_weights"], fields["num_experts"]
    if experts.shape != () or not np.issubdtype(experts.dtype, np.integer):
        raise ShunterError(
            f"{path}: num_experts must be one integer, got {experts.dtype} {list(experts.shape)}"
        )
    if not np.issubdtype(weights.dtype, np.floating):
        raise ShunterError(f"{path}: gate_weights must be floats, got {weights.dtype}")
    trace = RoutingTrace.__new__(RoutingTrace)
    trace.expert_ids = ids
    trace.gate_weights = np.asarray(weights, dtype=np.float32)
    trace.num_experts = int(experts)
    trace.layer_indices = np.asarray(fields.get("layer_indices", np.arange(ids.shape[0] if ids.ndim else 0)))
    trace.model = str(fields.get("model", ""))
    trace.source = str(fields.get("source", ""))
    trace.token_ids = fields.get("token_ids")
    trace.validate(source=str(path))
    return trace


@dataclass
class RoutingRecorder:
    """Collects expert choices during forwards. Pass it to the executor; call `trace()` after."""

    layer_indices: list[int]
    num_experts: int
    _ids: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    _weights: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    _tokens: list[torch.Tensor] = field(default_factory=list)

    def record(
        self, layer: int, expert_ids: torch.Tensor, gate_weights: torch.Tensor, keep: torch.Tensor | None
    ) -> None:
        """expert_ids/gate_weights [N, k] for the N tokens of one forward; keep [N] drops padding."""
        if keep is not None:
            expert_ids, gate_weights = expert_ids[keep], gate_weights[keep]
        self._ids.setdefault(layer, []).append(expert_ids.to(torch.int32).cpu())
        self._weights.setdefault(layer, []).append(gate_weights.float().cpu())

    def record_tokens(self, token_ids: torch.Tensor, keep: torch.Tensor | None) -> None:
        self._tokens.append((token_ids[keep] if keep is not None else token_ids).cpu())

    def trace(self, model: str = "", source: str = "") -> RoutingTrace:
        if not self._ids:
            raise ShunterError("no tokens were routed, so there is no trace to write")
        ids = np.stack([torch.cat(self._ids[i]).numpy() for i in self.layer_indices])
        weights = np.stack([torch.cat(self._weights[i]).numpy() for i in self.layer_indices])
        tokens = torch.cat(self._tokens).numpy() if self._tokens else None
        return RoutingTrace(
            ids, weights, self.num_experts, np.array(self.layer_indices), model, source, tokens
        )
