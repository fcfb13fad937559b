"""The plan document: what `shunter plan --out` writes and every consumer reads (simulate, bench a2a,
the expert-parallel runtime). One writer (`document_from_plan` + `PlanDocument.to_dict`), one reader
(`read_plan` / `load_plan`), versioned, round-trip tested; one room so that writer and reader
cannot drift apart.

A layer's placement is stored the way a runtime consumes it, as physical expert slots (compare
DeepSeek EPLB's `phy2log`, `log2phy`, `logcnt`): slot s holds expert `slot_expert[s]` on device
`slot_device[s]` and takes `slot_share[s]` of that expert's tokens (the shares of one expert's slots
sum to 1). An exclusive placement has one slot per expert with share 1; a replicated one more.

JSON, version 2 (version 1, written before slots existed, is read too; its slots are derived from
`placement`):
    {"version": 2, "mode": "exclusive" | "replicated" | "colocated",
     "cluster": {"devices": [{"bandwidth_bytes_s", "compute_flop_s", "memory_bytes", ...}]},
     "models": [{"name", "num_layers", "num_experts", "top_k"}]   (two for colocated plans),
     "options": {"bytes_per_token", "flops_per_token", ...},
     "layers": [{"layer", "layer_time_s", "dispatch": {"makespan_s", "rounds", "total_bytes",
                 ["schedule": {round_of, src, dst, bytes, rate_bytes_s}]}, ...,
                 "placement": {...as printed...},
                 "slots": [{"device": [S], "expert": [S], "share": [S]}, ...one per model]}],
     "summary": {...}, "inputs": {"cluster", "trace", "colocate"}}
Fields the consumers do not read (the planner's reference figures, summary, replication loads) are
kept verbatim in `report` so a read-then-written plan loses nothing.

One room on purpose: the document's types, its one writer, its one reader and the checks of a plan
against what it is used with change together whenever the format does (slots are in plan/slots.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from shunter.errors import ShunterError
from shunter.files import read_text_input, write_json
from shunter.network.schedule import Schedule
from shunter.plan.cluster import ClusterSpec
from shunter.plan.slots import ExpertSlots, read_slots, slots_from_placement

PLAN_VERSION = 2
READABLE_VERSIONS = (1, 2)
MODES = ("exclusive", "replicated", "colocated")


@dataclass(frozen=True)
class ModelInfo:
    """The model a plan places: checked against every trace or checkpoint it is used with."""

    name: str
    num_layers: int
    num_experts: int
    top_k: int

    def to_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "num_layers": self.num_layers,
            "num_experts": self.num_experts,
            "top_k": self.top_k,
        }


@dataclass(frozen=True)
class DispatchSummary:
    """The planner's dispatch all-to-all of one layer: its makespan, rounds and bytes, and every
    round when the plan was written with --include-schedules."""

    makespan_s: float
    rounds: int
    total_bytes: float
    schedule: Schedule | None = field(default=None, compare=False)  # arrays: compared by the tests


@dataclass(frozen=True)
class LayerEntry:
    """One MoE layer: slots per model (one, or two when colocated), the dispatch summary, the
    planner's layer time, and the rest of the planner's layer report, kept verbatim."""

    layer: int
    slots: tuple[ExpertSlots, ...]
    dispatch: DispatchSummary | None
    predicted_layer_s: float | None
    report: dict[str, Any] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class PlanDocument:
    """A plan, typed. device_specs [(bandwidth_bytes_s, compute_flop_s)] per device."""

    mode: str
    device_specs: tuple[tuple[float, float], ...]
    bytes_per_token: float
    flops_per_token: float
    models: tuple[ModelInfo | None, ...]
    layers: tuple[LayerEntry, ...]
    inputs: dict[str, Any] = field(default_factory=dict, compare=False)
    report: dict[str, Any] = field(default_factory=dict, compare=False)
    source: str = field(default="", compare=False)
    version: int = PLAN_VERSION

    @property
    def num_devices(self) -> int:
        return len(self.device_specs)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def slots(self, layer: int, model: int = 0) -> ExpertSlots:
        return self.layers[layer].slots[model]

    # The simulator's view: shares [E, n] per layer per model.
    @property
    def shares_a(self) -> list[np.ndarray]:
        return [entry.slots[0].shares() for entry in self.layers]

    @property
    def shares_b(self) -> list[np.ndarray] | None:
        if self.mode != "colocated":
            return None
        return [entry.slots[1].shares() for entry in self.layers]

    @property
    def schedules(self) -> list[Schedule | None]:
        return [entry.dispatch.schedule if entry.dispatch else None for entry in self.layers]

    @property
    def summaries(self) -> list[tuple[float, int, float] | None]:
        return [
            (e.dispatch.makespan_s, e.dispatch.rounds, e.dispatch.total_bytes) if e.dispatch else None
            for e in self.layers
        ]

    @property
    def predicted_layer_s(self) -> list[float | None]:
        return [entry.predicted_layer_s for entry in self.layers]

    @property
    def trace_path(self) -> str | None:
        value = self.inputs.get("trace")
        return value if isinstance(value, str) else None

    @property
    def colocate_path(self) -> str | None:
        value = self.inputs.get("colocate")
        return value if isinstance(value, str) else None

    def to_dict(self) -> dict[str, Any]:
        """The JSON document (version PLAN_VERSION)."""
        out: dict[str, Any] = {"version": PLAN_VERSION, "mode": self.mode}
        out.update({k: v for k, v in self.report.items() if k not in ("version", "mode", "layers")})
        cluster = dict(out.get("cluster") or {})
        if not cluster.get("devices"):
            cluster["devices"] = [{"bandwidth_bytes_s": b, "compute_flop_s": c} for b, c in self.device_specs]
        out["cluster"] = cluster
        out["options"] = {
            **(out.get("options") or {}),
            "bytes_per_token": self.bytes_per_token,
            "flops_per_token": self.flops_per_token,
        }
        out["models"] = [m.to_dict() if m is not None else None for m in self.models]
        out["layers"] = [_layer_to_dict(entry) for entry in self.layers]
        out["inputs"] = dict(self.inputs)
        return out


def _layer_to_dict(entry: LayerEntry) -> dict[str, Any]:
    out: dict[str, Any] = {"layer": entry.layer, "layer_time_s": entry.predicted_layer_s}
    out.update({k: v for k, v in entry.report.items() if k not in ("layer", "layer_time_s", "slots")})
    if entry.dispatch is not None:
        dispatch = dict(out.get("dispatch") or {})
        dispatch.update(
            makespan_s=entry.dispatch.makespan_s,
            rounds=entry.dispatch.rounds,
            total_bytes=entry.dispatch.total_bytes,
        )
        if entry.dispatch.schedule is not None:
            s = entry.dispatch.schedule
            dispatch["schedule"] = {
                "round_of": s.round_of.tolist(),
                "src": s.src.tolist(),
                "dst": s.dst.tolist(),
                "bytes": s.bytes.tolist(),
                "rate_bytes_s": s.rate_bytes_s.tolist(),
            }
        out["dispatch"] = dispatch
    out["slots"] = [slots.to_dict() for slots in entry.slots]
    return out


# ---------------------------------------------------------------------------------------------
# writer


def document_from_plan(
    plan: Any,
    models: tuple[ModelInfo, ...],
    inputs: dict[str, Any],
    include_rounds: bool = False,
) -> PlanDocument:
    """The document of a ClusterPlan (`shunter.plan.planner`) made for `models` from `inputs`."""
    report = plan.to_dict(include_rounds)
    layers = []
    for layer_plan, layer_report in zip(plan.layers, report["layers"], strict=True):
        dispatch = layer_plan.dispatch
        layers.append(
            LayerEntry(
                layer=layer_plan.layer,
                slots=tuple(ExpertSlots.from_shares(p.shares) for p in layer_plan.placements),
                dispatch=DispatchSummary(
                    dispatch.makespan_s,
                    dispatch.schedule.num_rounds,
                    float(dispatch.traffic_bytes.sum()),
                    dispatch.schedule if include_rounds else None,
                ),
                predicted_layer_s=layer_plan.layer_time_s,
                report=layer_report,
            )
        )
    cluster: ClusterSpec = plan.cluster
    return PlanDocument(
        mode=plan.mode,
        device_specs=tuple((d.bandwidth_bytes_s, d.compute_flop_s) for d in cluster.devices),
        bytes_per_token=float(plan.options.bytes_per_token),
        flops_per_token=float(plan.options.flops_per_token),
        models=models,
        layers=tuple(layers),
        inputs=dict(inputs),
        report={k: v for k, v in report.items() if k != "layers"},
    )


def model_info_of_trace(trace: Any) -> ModelInfo:
    """A RoutingTrace's model: its name, MoE layers, experts and choices per token."""
    return ModelInfo(trace.model or "", trace.num_layers, trace.num_experts, trace.top_k)


def write_plan(document: PlanDocument, path: str | Path) -> None:
    """Atomically: a temporary file in the same directory, then a rename (no half-written plan)."""
    write_json(path, document.to_dict())


# ---------------------------------------------------------------------------------------------
# reader


def load_plan(path: str | Path) -> PlanDocument:
    """Read a plan file; every problem is one ShunterError naming the file and the field."""
    text = read_text_input(path, "plan", "JSON")
    try:
        document = json.loads(text)
    except ValueError as exc:
        raise ShunterError(f"{path}: not valid JSON: {exc}") from None
    return read_plan(document, str(path))


def read_plan(document: object, source: str) -> PlanDocument:
    """A PlanDocument from parsed JSON; every problem is a ShunterError naming `source` and the field."""
    if not isinstance(document, dict):
        raise ShunterError(f"{source}: not a plan (expected a JSON object written by `shunter plan --out`)")
    version = document.get("version", 1)
    if version not in READABLE_VERSIONS or isinstance(version, bool):
        raise ShunterError(
            f"{source}: version is {version!r}; this Shunter reads plan versions "
            f"{', '.join(map(str, READABLE_VERSIONS))} (make the plan again with `shunter plan --out`)"
        )
    for key in ("mode", "cluster", "options", "layers"):
        if key not in document:
            raise ShunterError(
                f"{source}: field {key!r} is missing (is this a file from `shunter plan --out`?)"
            )
    mode = document["mode"]
    if mode not in MODES:
        raise ShunterError(f"{source}: mode is {mode!r}, expected exclusive, replicated or colocated")
    cluster = document["cluster"]
    devices = cluster.get("devices") if isinstance(cluster, dict) else None
    if not isinstance(devices, list) or not devices:
        raise ShunterError(f"{source}: cluster.devices: expected the list of devices the plan was made for")
    try:
        specs = tuple((float(d["bandwidth_bytes_s"]), float(d["compute_flop_s"])) for d in devices)
    except (KeyError, TypeError, ValueError):
        raise ShunterError(
            f"{source}: cluster.devices: each needs bandwidth_bytes_s and compute_flop_s"
        ) from None
    if not all(np.isfinite(value) and value > 0 for spec in specs for value in spec):
        raise ShunterError(
            f"{source}: cluster.devices: bandwidth_bytes_s and compute_flop_s must be positive numbers"
        )
    options = document["options"]
    try:
        bytes_per_token = float(options["bytes_per_token"])
        flops_per_token = float(options["flops_per_token"])
    except (KeyError, TypeError, ValueError):
        raise ShunterError(f"{source}: options: bytes_per_token and flops_per_token are needed") from None
    if not (np.isfinite(bytes_per_token) and bytes_per_token > 0):
        raise ShunterError(f"{source}: options.bytes_per_token: expected a positive number")
    if not (np.isfinite(flops_per_token) and flops_per_token > 0):
        raise ShunterError(f"{source}: options.flops_per_token: expected a positive number")
    num_models = 2 if mode == "colocated" else 1
    models = _models(document.get("models"), num_models, source)
    layers = document["layers"]
    if not isinstance(layers, list) or not layers:
        raise ShunterError(f"{source}: layers: expected one entry per MoE layer")
    n = len(specs)
    entries = tuple(
        _layer(layer, index, mode, num_models, n, version, f"{source}: layers[{index}]")
        for index, layer in enumerate(layers)
    )
    for model, info in enumerate(models):
        experts = {entry.slots[model].num_experts for entry in entries}
        if info is not None and (experts != {info.num_experts} or info.num_layers != len(entries)):
            raise ShunterError(
                f"{source}: models[{model}]: the plan places {sorted(experts)} experts in {len(entries)} "
                f"layers, but the model has {info.num_experts} experts in {info.num_layers} layers"
            )
    inputs = document.get("inputs") if isinstance(document.get("inputs"), dict) else {}
    report = {k: v for k, v in document.items() if k not in ("layers", "inputs")}
    return PlanDocument(
        mode=mode,
        device_specs=specs,
        bytes_per_token=bytes_per_token,
        flops_per_token=flops_per_token,
        models=models,
        layers=entries,
        inputs=inputs,
        report=report,
        source=source,
        version=int(version),
    )


def _models(value: object, count: int, source: str) -> tuple[ModelInfo | None, ...]:
    """Plans of version 1 name no model: None, and only the traces' shapes are checked."""
    if value is None:
        return (None,) * count
    if not isinstance(value, list) or len(value) != count:
        raise ShunterError(f"{source}: models: expected a list of {count} model description(s)")
    out = []
    for index, entry in enumerate(value):
        try:
            info = ModelInfo(
                str(entry["name"]), int(entry["num_layers"]), int(entry["num_experts"]), int(entry["top_k"])
            )
        except (KeyError, TypeError, ValueError):
            raise ShunterError(
                f"{source}: models[{index}]: expected name, num_layers, num_experts and top_k"
            ) from None
        if min(info.num_layers, info.num_experts, info.top_k) < 1:
            raise ShunterError(f"{source}: models[{index}]: layers, experts and top_k must be positive")
        out.append(info)
    return tuple(out)


def _layer(
    layer: object, index: int, mode: str, num_models: int, n: int, version: int, where: str
) -> LayerEntry:
    if not isinstance(layer, dict):
        raise ShunterError(f"{where}: expected an object")
    if version >= 2:
        raw = layer.get("slots")
        if not isinstance(raw, list) or len(raw) != num_models:
            raise ShunterError(f"{where}.slots: expected {num_models} slot table(s)")
        slots = tuple(read_slots(entry, n, f"{where}.slots[{m}]") for m, entry in enumerate(raw))
    else:
        slots = slots_from_placement(layer.get("placement"), mode, n, f"{where}.placement")
    value = layer.get("layer_time_s")
    predicted = float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None
    number = layer.get("layer", index)
    report = {k: v for k, v in layer.items() if k not in ("layer", "layer_time_s", "slots")}
    return LayerEntry(
        layer=number if isinstance(number, int) else index,
        slots=slots,
        dispatch=_dispatch(layer.get("dispatch"), n, f"{where}.dispatch"),
        predicted_layer_s=predicted,
        report=report,
    )


def _dispatch(dispatch: object, n: int, where: str) -> DispatchSummary | None:
    if not isinstance(dispatch, dict):
        return None
    values = (dispatch.get("makespan_s"), dispatch.get("rounds"), dispatch.get("total_bytes"))
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        return None
    rounds = values[1]
    if not all(np.isfinite(v) and v >= 0 for v in values):
        raise ShunterError(f"{where}: makespan_s, rounds and total_bytes must be finite and not negative")
    if not float(rounds).is_integer():  # type: ignore[arg-type]
        raise ShunterError(f"{where}.rounds: expected a whole number of rounds, got {rounds!r}")
    schedule = _schedule(dispatch["schedule"], n, f"{where}.schedule") if "schedule" in dispatch else None
    return DispatchSummary(float(values[0]), int(values[1]), float(values[2]), schedule)  # type: ignore[arg-type]


def _schedule(data: object, n: int, where: str) -> Schedule:
    try:
        round_of = np.asarray(data["round_of"], dtype=np.int64)  # type: ignore[index]
        arrays = [np.asarray(data[key]) for key in ("src", "dst", "bytes", "rate_bytes_s")]  # type: ignore[index]
    except (KeyError, TypeError, ValueError):
        raise ShunterError(f"{where}: expected round_of, src, dst, bytes and rate_bytes_s lists") from None
    src, dst = arrays[0].astype(np.int64), arrays[1].astype(np.int64)
    if not all(a.shape == round_of.shape for a in arrays):
        raise ShunterError(f"{where}: round_of, src, dst, bytes and rate_bytes_s differ in length")
    if round_of.size and (
        round_of.min() < 0 or min(src.min(), dst.min()) < 0 or max(src.max(), dst.max()) >= n
    ):
        raise ShunterError(f"{where}: round_of must not be negative and src, dst must be devices 0..{n - 1}")
    try:
        sizes, rates = arrays[2].astype(np.float64), arrays[3].astype(np.float64)
    except (TypeError, ValueError):
        raise ShunterError(f"{where}: bytes and rate_bytes_s must be numbers") from None
    if not (
        np.all(np.isfinite(sizes)) and np.all(sizes >= 0) and np.all(np.isfinite(rates)) and np.all(rates > 0)
    ):
        raise ShunterError(
            f"{where}: bytes must be finite and not negative, rate_bytes_s finite and positive"
        )
    rounds = int(round_of.max()) + 1 if round_of.size else 0
    return Schedule(round_of, src, dst, sizes, rates, rounds, n, "from plan")


# ---------------------------------------------------------------------------------------------
# checks against what the plan is used with


def check_plan_against(plan: PlanDocument, cluster: ClusterSpec, cluster_source: str) -> list[str]:
    """ShunterError when the plan cannot run on this cluster (device count); notes when the devices
    differ in speed (a what-if the simulator answers)."""
    if plan.num_devices != cluster.num_devices:
        raise ShunterError(
            f"{plan.source}: the plan is for a cluster of {plan.num_devices} devices, {cluster_source} has "
            f"{cluster.num_devices}; make a plan for this cluster with `shunter plan --cluster "
            f"{cluster_source}`"
        )
    notes = []
    differing = [
        i
        for i, (device, spec) in enumerate(zip(cluster.devices, plan.device_specs, strict=True))
        if (device.bandwidth_bytes_s, device.compute_flop_s) != spec
    ]
    if differing:
        notes.append(
            f"{len(differing)} of {cluster.num_devices} devices differ in bandwidth or compute from the "
            f"cluster the plan was made for (first: device {differing[0]}); simulating the plan as it is"
        )
    return notes


def check_trace_against(plan: PlanDocument, trace: Any, trace_source: str, model: str = "a") -> None:
    """ShunterError when a RoutingTrace does not fit the plan's model (layers, experts, top-k)."""
    index = 0 if model == "a" else 1
    if index >= len(plan.layers[0].slots):
        raise ShunterError(f"{plan.source}: the plan places one model, not two")
    if trace.num_layers != plan.num_layers:
        raise ShunterError(
            f"{trace_source}: num_layers is {trace.num_layers}, the plan {plan.source} has "
            f"{plan.num_layers} layers"
        )
    experts = plan.slots(0, index).num_experts
    if trace.num_experts != experts:
        raise ShunterError(
            f"{trace_source}: num_experts is {trace.num_experts}, the plan {plan.source} places {experts} "
            "experts" + (" of the colocated model" if model == "b" else "")
        )
    info = plan.models[index]
    if info is not None and trace.top_k != info.top_k:
        raise ShunterError(
            f"{trace_source}: top_k is {trace.top_k}, the plan {plan.source} was made for top_k {info.top_k}"
        )


def check_model_against(plan: PlanDocument, num_layers: int, num_experts: int, source: str) -> None:
    """ShunterError when a checkpoint's MoE layers or experts differ from the plan's model."""
    experts = plan.slots(0).num_experts
    if num_experts != experts or num_layers != plan.num_layers:
        raise ShunterError(
            f"{plan.source}: the plan places {experts} experts in {plan.num_layers} MoE layers; "
            f"{source} has {num_experts} experts in {num_layers} MoE layers"
        )
