"""Every command against bad input: one clear line, exit status 2, and nothing left behind.

Each case writes its bad file (or picks its bad flag) in a fresh folder, runs `shunter ...` in-process
with that folder as the working directory, and checks the refusal contract of tests.cli.harness
(exit 2, one line on stderr, no traceback, no file created, changed or removed) and that the line
names the file, field or flag at fault. The good inputs around the bad one come from the built-in
model and small synthetic traces, built once per module.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from shunter.model.loader import resolve_model_dir
from shunter.trace.synthetic import zipf_trace
from tests.cli.harness import refused, run_in

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
TINY = resolve_model_dir("shunter-tiny")


@dataclass(frozen=True)
class Good:
    """Valid inputs, so that each case has exactly one thing wrong."""

    folder: Path
    cluster: str
    trace: str  # 2 MoE layers, 8 experts, top-2
    plan: str  # `shunter plan` of trace on cluster
    traffic: str  # 4 x 4 bytes

    def plan_dict(self) -> dict:
        return json.loads(Path(self.plan).read_text())


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Good:
    folder = tmp_path_factory.mktemp("good")
    cluster = folder / "cluster.toml"
    shutil.copy(EXAMPLES / "cluster-homogeneous.toml", cluster)
    trace = folder / "trace.npz"
    zipf_trace(2, 256, 8, 2, 1.2, 0.6, 0).save(trace)
    traffic = folder / "traffic.npy"
    np.save(traffic, np.arange(16, dtype=np.float64).reshape(4, 4) * 1e6)
    plan = folder / "plan.json"
    code, _, err = run_in(
        ["plan", "--cluster", str(cluster), "--trace", str(trace), "--out", str(plan), "--no-baselines"],
        folder,
    )
    assert code == 0, err
    return Good(folder, str(cluster), str(trace), str(plan), str(traffic))


Case = Callable[[Path, Good], list[str]]
CASES: list[tuple[str, Case, str]] = []


def case(name: str, expect: str) -> Callable[[Case], Case]:
    """Register a case: `expect` must appear in the one line of the refusal."""

    def register(build: Case) -> Case:
        CASES.append((name, build, expect))
        return build

    return register


def cases(names_argv_expect: list[tuple[str, list[str], str]]) -> None:
    """Cases that need no file of their own: argv with `{cluster}`, `{trace}`, ... filled from Good."""
    for name, argv, expect in names_argv_expect:

        def build(d: Path, g: Good, argv: list[str] = argv) -> list[str]:
            fill = {"cluster": g.cluster, "trace": g.trace, "plan": g.plan, "traffic": g.traffic}
            return [part.format(**fill) for part in argv]

        CASES.append((name, build, expect))


def write(path: Path, content: str | bytes) -> str:
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return str(path)


def save_npz(path: Path, **arrays: object) -> str:
    with open(path, "wb") as f:
        np.savez(f, **arrays)  # a file object, so numpy adds no suffix
    return str(path)


def trace_arrays(layers: int = 2, tokens: int = 16, experts: int = 8, k: int = 2) -> dict[str, object]:
    rng = np.random.default_rng(0)
    return {
        "expert_ids": rng.integers(0, experts, (layers, tokens, k)).astype(np.int32),
        "gate_weights": np.full((layers, tokens, k), 1.0 / k, np.float32),
        "num_experts": np.int64(experts),
        "layer_indices": np.arange(layers),
    }


def tiny_copy(d: Path) -> Path:
    """A copy of the built-in model in `d`, for a case to break."""
    model = d / "model"
    shutil.copytree(TINY, model)
    return model


# ---------------------------------------------------------------------------------------------
# output paths (--out, --plot): checked before the work


@case("plan --out a directory", "--out")
def _(d: Path, g: Good) -> list[str]:
    (d / "outdir").mkdir()
    return ["plan", "--cluster", g.cluster, "--trace", g.trace, "--out", "outdir"]


@case("plan --out under a file", "--out")
def _(d: Path, g: Good) -> list[str]:
    write(d / "afile", "keep")
    return ["plan", "--cluster", g.cluster, "--trace", g.trace, "--out", "afile/plan.json"]


@case("trace --out a directory", "--out")
def _(d: Path, g: Good) -> list[str]:
    write(d / "text.txt", "def f(x):\n    return x\n")
    (d / "outdir").mkdir()
    return ["trace", "--text", "text.txt", "--out", "outdir"]


@case("trace --out under a file", "--out")
def _(d: Path, g: Good) -> list[str]:
    write(d / "text.txt", "def f(x):\n    return x\n")
    write(d / "afile", "keep")
    return ["trace", "--text", "text.txt", "--out", "afile/t.npz"]


@case("simulate --plot a directory", "--plot")
def _(d: Path, g: Good) -> list[str]:
    (d / "fig.png").mkdir()
    return [*SIMULATE_ARGS(g), "--plot", "fig.png"]


@case("simulate --plot an unknown format", "--plot")
def _(d: Path, g: Good) -> list[str]:
    return [*SIMULATE_ARGS(g), "--plot", "fig.gif"]


@case("simulate --plot without a suffix", "--plot")
def _(d: Path, g: Good) -> list[str]:
    return [*SIMULATE_ARGS(g), "--plot", "figure"]


@case("reproduce --plot an unknown format", "--plot")
def _(d: Path, g: Good) -> list[str]:
    return ["reproduce", "aurora", "--quick", "--plot", "fig.txt"]


@case("reproduce --plot under a file", "--plot")
def _(d: Path, g: Good) -> list[str]:
    write(d / "afile", "keep")
    return ["reproduce", "aurora", "--quick", "--plot", "afile/fig.png"]


@case("bench offload --out a directory", "--out")
def _(d: Path, g: Good) -> list[str]:
    (d / "outdir").mkdir()
    return ["bench", "offload", str(TINY), "--memory", "1GiB", "--out", "outdir"]


@case("bench a2a --out under a file", "--out")
def _(d: Path, g: Good) -> list[str]:
    write(d / "afile", "keep")
    return ["bench", "a2a", "--hosts", "2", "--bandwidth", "1Gbit/s", "--out", "afile/r.json"]


@case("train --out under a file", "afile/model")
def _(d: Path, g: Good) -> list[str]:
    write(d / "afile", "keep")
    return ["train", "--out", "afile/model", "--steps", "1"]


def SIMULATE_ARGS(g: Good) -> list[str]:
    return ["simulate", "--cluster", g.cluster, "--plan", g.plan, "--trace", g.trace]


# ---------------------------------------------------------------------------------------------
# numeric flags

GEN = ["generate", "--prompt-ids", "1,2", "--max-new-tokens", "1"]
cases(
    [
        *[
            (f"generate --temperature {v}", [*GEN, "--temperature", v], "--temperature")
            for v in ("nan", "-1", "inf", "x")
        ],
        *[(f"generate --top-p {v}", [*GEN, "--top-p", v], "--top-p") for v in ("nan", "0", "1.5", "-inf")],
        *[(f"generate --seed {v}", [*GEN, "--seed", v], "--seed") for v in ("1e23", "-1", "2**64", "1.5")],
        *[(f"generate --memory {v}", [*GEN, "--memory", v], "--memory") for v in ("1e400", "-1GB", "12gb")],
        ("generate --host-memory nan", [*GEN, "--host-memory", "nan"], "--host-memory"),
        ("generate --max-new-tokens 0", [*GEN[:-1], "0"], "--max-new-tokens"),
        ("generate --max-new-tokens past the context", [*GEN[:-1], "5000"], "max_position_embeddings"),
        ("generate --batch 0", [*GEN, "--batch", "0"], "--batch"),
        ("generate --batches -1", [*GEN, "--batches", "-1"], "--batches"),
        (
            "generate --prompt-ids outside the vocabulary",
            ["generate", "--prompt-ids", "99999"],
            "--prompt-ids",
        ),
        ("generate --prompt-ids not numbers", ["generate", "--prompt-ids", "a,b"], "--prompt-ids"),
        ("generate --prompt-ids empty", ["generate", "--prompt-ids", ","], "--prompt-ids"),
        ("generate without a prompt", ["generate"], "--prompt"),
        (
            "generate an unknown built-in model",
            ["generate", "no-such-model", "--prompt-ids", "1"],
            "no-such-model",
        ),
        *[
            (
                f"plan --seed {v}",
                ["plan", "--cluster", "{cluster}", "--trace", "{trace}", "--seed", v],
                "--seed",
            )
            for v in ("-1", "1e23")
        ],
        *[
            (
                f"plan --flops-per-token {v}",
                ["plan", "--cluster", "{cluster}", "--flops-per-token", v],
                "--flops",
            )
            for v in ("nan", "0", "-5", "inf")
        ],
        *[
            (
                f"plan --bytes-per-token {v}",
                ["plan", "--cluster", "{cluster}", "--bytes-per-token", v],
                "--bytes",
            )
            for v in ("0", "-1", "1e400", "8kb")
        ],
        ("plan --path-length -1", ["plan", "--cluster", "{cluster}", "--path-length", "-1"], "--path-length"),
        (
            "plan --max-experts-per-device 0",
            ["plan", "--cluster", "{cluster}", "--max-experts-per-device", "0"],
            "--max-experts-per-device",
        ),
        (
            "plan --replicate --colocate",
            ["plan", "--cluster", "{cluster}", "--trace", "{trace}", "--replicate", "--colocate", "{trace}"],
            "--replicate",
        ),
        *[
            (
                f"schedule --seed {v}",
                ["schedule", "{traffic}", "--bandwidth", "1Gbit/s", "--seed", v],
                "--seed",
            )
            for v in ("-1", "nan")
        ],
        *[
            (f"schedule --bandwidth {v}", ["schedule", "{traffic}", "--bandwidth", v], "--bandwidth")
            for v in ("inf", "nan", "-1Gbit/s", "0", "100gb", "1Gbit/s,2Gbit/s", "fast")
        ],
        *[(f"stats --seed {v}", ["stats", "{trace}", "--seed", v], "--seed") for v in ("-1", "1e23")],
        *[
            (
                f"simulate --efficiency {v}",
                ["simulate", "--cluster", "{cluster}", "--plan", "{plan}", "--efficiency", v],
                "--efficiency",
            )
            for v in ("nan", "0", "2")
        ],
        (
            "simulate --latency -1ms",
            ["simulate", "--cluster", "{cluster}", "--plan", "{plan}", "--latency", "-1ms"],
            "--latency",
        ),
        (
            "simulate --latency nan",
            ["simulate", "--cluster", "{cluster}", "--plan", "{plan}", "--latency", "nan"],
            "--latency",
        ),
        *[
            (f"train --{flag} {v}", ["train", "--out", "m", f"--{flag}", v], f"--{flag}")
            for flag, v in (
                ("lr", "-1"),
                ("lr", "nan"),
                ("lr", "inf"),
                ("lr", "0"),
                ("vocab-size", "2"),
                ("vocab-size", "0"),
                ("steps", "0"),
                ("seed", "-1"),
                ("seed", "1e23"),
                ("min-lr-ratio", "2"),
                ("grad-clip", "nan"),
                ("weight-decay", "-1"),
                ("top-k", "9"),
                ("hidden-size", "255"),
                ("seq-len", "5000"),
                ("save-dtype", "int8"),
                ("batch-size", "0"),
                ("heldout-percent", "100"),
            )
        ],
        ("train --resume without a checkpoint", ["train", "--out", "m", "--resume"], "--resume"),
        ("trace --window 0", ["trace", "--text", "{cluster}", "--out", "t.npz", "--window", "0"], "--window"),
        (
            "trace --max-tokens -5",
            ["trace", "--text", "{cluster}", "--out", "t.npz", "--max-tokens", "-5"],
            "--max-tokens",
        ),
        (
            "trace --max-tokens 0",
            ["trace", "--text", "{cluster}", "--out", "t.npz", "--max-tokens", "0"],
            "--max-tokens",
        ),
        ("trace --text missing", ["trace", "--text", "missing.txt", "--out", "t.npz"], "missing.txt"),
        *[
            (
                f"bench offload --{flag} {v}",
                ["bench", "offload", str(TINY), "--memory", m, f"--{flag}", v],
                f"--{flag}",
            )
            for flag, v, m in (
                ("run-timeout", "nan", "1GiB"),
                ("run-timeout", "-1", "1GiB"),
                ("memory", "1e400", "1GiB"),
            )
        ],
        ("bench offload --memory bad", ["bench", "offload", str(TINY), "--memory", "lots"], "--memory"),
        (
            "bench a2a --timeout nan",
            ["bench", "a2a", "--hosts", "2", "--bandwidth", "1Gbit/s", "--timeout", "nan"],
            "--timeout",
        ),
        ("bench a2a --bandwidth inf", ["bench", "a2a", "--hosts", "2", "--bandwidth", "inf"], "--bandwidth"),
        ("bench a2a --hosts 0", ["bench", "a2a", "--hosts", "0", "--bandwidth", "1Gbit/s"], "--hosts"),
        ("cluster run --timeout nan", ["cluster", "run", "--timeout", "nan", "x"], "--timeout"),
        ("reproduce an unknown paper", ["reproduce", "switch"], "switch"),
    ]
)


# ---------------------------------------------------------------------------------------------
# cluster TOML

CLUSTER_ROW = 'name = "g"\ncount = 4\nbandwidth = "100Gbit/s"\ncompute = "312TFLOP/s"\nmemory = "80GiB"\n'
BAD_CLUSTERS = {
    "bandwidth inf": CLUSTER_ROW.replace('"100Gbit/s"', "inf"),
    "bandwidth nan": CLUSTER_ROW.replace('"100Gbit/s"', "nan"),
    "bandwidth ambiguous": CLUSTER_ROW.replace("100Gbit/s", "100gb"),
    "bandwidth zero": CLUSTER_ROW.replace('"100Gbit/s"', "0"),
    "bandwidth a table": CLUSTER_ROW.replace('"100Gbit/s"', "{ a = 1 }"),
    "memory nan": CLUSTER_ROW.replace('"80GiB"', "nan"),
    "memory 1e400 string": CLUSTER_ROW.replace("80GiB", "1e400"),
    "memory negative": CLUSTER_ROW.replace('"80GiB"', "-1"),
    "compute -inf": CLUSTER_ROW.replace('"312TFLOP/s"', "-inf"),
    "compute words": CLUSTER_ROW.replace("312TFLOP/s", "fast"),
    "count zero": CLUSTER_ROW.replace("count = 4", "count = 0"),
    "count a billion": CLUSTER_ROW.replace("count = 4", "count = 1_000_000_000"),
    "count a float": CLUSTER_ROW.replace("count = 4", "count = 2.5"),
    "unknown key": CLUSTER_ROW + "speed = 1\n",
    "no bandwidth": CLUSTER_ROW.replace('bandwidth = "100Gbit/s"\n', ""),
}


def _bad_cluster(text: str, toml: bool = True) -> Case:
    def build(d: Path, g: Good) -> list[str]:
        body = f"[[devices]]\n{text}" if toml else text
        return ["plan", "--cluster", write(d / "bad.toml", body), "--trace", g.trace, "--no-baselines"]

    return build


for _name, _text in BAD_CLUSTERS.items():
    CASES.append((f"cluster TOML: {_name}", _bad_cluster(_text), "bad.toml"))
for _name, _text in {
    "not TOML": "[[devices]\nx=",
    "empty": "",
    "no devices": 'name = "x"\n',
    "devices not tables": "devices = [1, 2]\n",
    "binary": "\x00\x01\x02",
    "unknown top-level key": "[[devices]]\n" + CLUSTER_ROW + "[extra]\n",
}.items():
    CASES.append((f"cluster TOML: {_name}", _bad_cluster(_text, toml=False), "bad.toml"))


@case("cluster TOML: not UTF-8", "bad.toml")
def _(d: Path, g: Good) -> list[str]:
    return ["plan", "--cluster", write(d / "bad.toml", b"\xff\xfe\x00bandwidth"), "--trace", g.trace]


@case("cluster TOML: missing", "missing.toml")
def _(d: Path, g: Good) -> list[str]:
    return ["plan", "--cluster", "missing.toml", "--trace", g.trace]


@case("cluster TOML: a directory", "adir")
def _(d: Path, g: Good) -> list[str]:
    (d / "adir").mkdir()
    return ["plan", "--cluster", "adir", "--trace", g.trace]


@case("simulate: a cluster of another size than the plan's", "devices")
def _(d: Path, g: Good) -> list[str]:
    cluster = write(d / "two.toml", "[[devices]]\n" + CLUSTER_ROW.replace("count = 4", "count = 2"))
    return ["simulate", "--cluster", cluster, "--plan", g.plan]


# ---------------------------------------------------------------------------------------------
# traces


def _bad_trace_file(content: Callable[[Path], str], command: str = "plan") -> Case:
    def build(d: Path, g: Good) -> list[str]:
        path = content(d)
        if command == "plan":
            return ["plan", "--cluster", g.cluster, "--trace", path, "--no-baselines"]
        if command == "stats":
            return ["stats", path]
        if command == "simulate":
            return ["simulate", "--cluster", g.cluster, "--plan", g.plan, "--trace", path]
        if command == "generate":
            return ["generate", "--prompt-ids", "1", "--max-new-tokens", "1", "--trace", path]
        if command == "plan --profile":
            return ["plan", "--cluster", g.cluster, "--trace", g.trace, "--replicate", "--profile", path]
        if command == "plan --colocate":
            return ["plan", "--cluster", g.cluster, "--trace", g.trace, "--colocate", path]
        raise AssertionError(command)

    return build


def _arrays(**changes: object) -> Callable[[Path], str]:
    def content(d: Path) -> str:
        arrays = trace_arrays()
        arrays.update(changes)
        return save_npz(d / "bad.npz", **{k: v for k, v in arrays.items() if v is not None})

    return content


TRACE_CONTENTS: dict[str, Callable[[Path], str]] = {
    "empty file": lambda d: write(d / "bad.npz", b""),
    "a .npy array": lambda d: (np.save(d / "bad.npy", np.zeros(3)), str(d / "bad.npy"))[1],
    "a plan JSON": lambda d: write(d / "bad.npz", '{"format_version": 2, "layers": []}'),
    "random bytes": lambda d: write(d / "bad.npz", bytes(range(256)) * 4),
    "text": lambda d: write(d / "bad.npz", "expert_ids = 1\n"),
    "zero tokens": _arrays(
        expert_ids=np.zeros((2, 0, 2), np.int32), gate_weights=np.zeros((2, 0, 2), np.float32)
    ),
    "zero layers": _arrays(
        expert_ids=np.zeros((0, 16, 2), np.int32),
        gate_weights=np.zeros((0, 16, 2), np.float32),
        layer_indices=np.zeros(0, np.int64),
    ),
    "zero choices": _arrays(
        expert_ids=np.zeros((2, 16, 0), np.int32), gate_weights=np.zeros((2, 16, 0), np.float32)
    ),
    "no expert_ids": _arrays(expert_ids=None),
    "no num_experts": _arrays(num_experts=None),
    "num_experts zero": _arrays(num_experts=np.int64(0)),
    "num_experts a million": _arrays(num_experts=np.int64(10**6)),
    "num_experts an array": _arrays(num_experts=np.arange(3)),
    "num_experts a float": _arrays(num_experts=np.float64(8.5)),
    "num_experts a string": _arrays(num_experts=np.str_("eight")),
    "expert ids out of range": _arrays(expert_ids=np.full((2, 16, 2), 8, np.int32)),
    "expert ids negative": _arrays(expert_ids=np.full((2, 16, 2), -1, np.int32)),
    "expert ids floats": _arrays(expert_ids=np.zeros((2, 16, 2), np.float32)),
    "expert ids bool": _arrays(expert_ids=np.zeros((2, 16, 2), bool)),
    "expert ids 2-D": _arrays(expert_ids=np.zeros((2, 16), np.int32)),
    "gate weights NaN": _arrays(gate_weights=np.full((2, 16, 2), np.nan, np.float32)),
    "gate weights inf": _arrays(gate_weights=np.full((2, 16, 2), np.inf, np.float32)),
    "gate weights strings": _arrays(gate_weights=np.full((2, 16, 2), "a")),
    "gate weights wrong shape": _arrays(gate_weights=np.zeros((2, 16, 3), np.float32)),
    "top-k above the experts": _arrays(
        expert_ids=np.zeros((2, 16, 9), np.int32), gate_weights=np.zeros((2, 16, 9), np.float32)
    ),
    "layer indices wrong length": _arrays(layer_indices=np.arange(5)),
    "layer indices floats": _arrays(layer_indices=np.array([0.5, 1.5])),
    "token ids wrong length": _arrays(token_ids=np.arange(3)),
}
for _name, _content in TRACE_CONTENTS.items():
    CASES.append((f"trace for plan: {_name}", _bad_trace_file(_content), "bad.np"))
for _name in (
    "empty file",
    "a .npy array",
    "a plan JSON",
    "zero tokens",
    "num_experts a million",
    "gate weights NaN",
    "zero layers",
):
    CASES.append((f"trace for stats: {_name}", _bad_trace_file(TRACE_CONTENTS[_name], "stats"), "bad.np"))
for _name in ("empty file", "zero tokens", "gate weights NaN", "a plan JSON"):
    CASES.append(
        (f"trace for simulate: {_name}", _bad_trace_file(TRACE_CONTENTS[_name], "simulate"), "bad.np")
    )
    CASES.append(
        (f"trace for generate: {_name}", _bad_trace_file(TRACE_CONTENTS[_name], "generate"), "bad.np")
    )
    CASES.append(
        (
            f"trace for plan --colocate: {_name}",
            _bad_trace_file(TRACE_CONTENTS[_name], "plan --colocate"),
            "bad.np",
        )
    )
    CASES.append(
        (
            f"trace for plan --profile: {_name}",
            _bad_trace_file(TRACE_CONTENTS[_name], "plan --profile"),
            "bad.np",
        )
    )

# a trace that is valid but from a model of another shape than the one it is used with
for _name, (layers, experts, k) in {
    "another layer count": (3, 8, 2),
    "another expert count": (6, 16, 2),
    "another top-k": (6, 8, 1),
}.items():
    CASES.append(
        (
            f"generate --trace from a model with {_name}",
            _bad_trace_file(
                lambda d, a=(layers, experts, k): save_npz(
                    d / "bad.npz", **trace_arrays(a[0], 16, a[1], a[2])
                ),
                "generate",
            ),
            "bad.npz",
        )
    )
    CASES.append(
        (
            f"simulate --trace from a model with {_name}",
            _bad_trace_file(
                lambda d, a=(layers, experts, k): save_npz(
                    d / "bad.npz", **trace_arrays(a[0], 16, a[1], a[2])
                ),
                "simulate",
            ),
            "bad.npz",
        )
    )
CASES.append(("trace missing", _bad_trace_file(lambda d: "missing.npz"), "missing.npz"))
CASES.append(("stats trace missing", _bad_trace_file(lambda d: "missing.npz", "stats"), "missing.npz"))


@case("bench offload: the model's trace has another layer count", "routing-trace.npz")
def _(d: Path, g: Good) -> list[str]:
    model = tiny_copy(d)
    save_npz(model / "routing-trace.npz", **trace_arrays(3, 16, 8, 2))
    return ["bench", "offload", str(model), "--memory", "780MiB", "--reps", "1"]


# ---------------------------------------------------------------------------------------------
# plan JSON


def _bad_plan(change: Callable[[dict], object]) -> Case:
    def build(d: Path, g: Good) -> list[str]:
        plan = g.plan_dict()
        replaced = change(plan)
        text = replaced if isinstance(replaced, str) else json.dumps(plan)
        return ["simulate", "--cluster", g.cluster, "--plan", write(d / "bad.json", text), "--trace", g.trace]

    return build


def _set(path: str, value: object) -> Callable[[dict], None]:
    def change(plan: dict) -> None:
        keys = path.split(".")
        target = plan
        for key in keys[:-1]:
            target = target[int(key)] if isinstance(target, list) else target[key]
        target[keys[-1]] = value

    return change


BAD_PLANS: dict[str, Callable[[dict], object]] = {
    "not JSON": lambda p: "{not json",
    "empty": lambda p: "",
    "a list": lambda p: "[1, 2]",
    "NaN literal": lambda p: json.dumps(p).replace('"version": 2', '"version": NaN'),
    "rounds -5": lambda p: _set("layers.0.dispatch.rounds", -5)(p),
    "rounds 2.5": lambda p: _set("layers.0.dispatch.rounds", 2.5)(p),
    "makespan -1": lambda p: _set("layers.0.dispatch.makespan_s", -1)(p),
    "total_bytes 1e400": lambda p: json.dumps(p).replace('"total_bytes": ', '"total_bytes": 1e400, "x": '),
    "version 99": lambda p: _set("version", 99)(p),
    "version true": lambda p: _set("version", True)(p),
    "mode unknown": lambda p: _set("mode", "sideways")(p),
    "no layers": lambda p: _set("layers", [])(p),
    "layers a string": lambda p: _set("layers", "many")(p),
    "layer not an object": lambda p: _set("layers", [1])(p),
    "no devices": lambda p: _set("cluster.devices", [])(p),
    "device bandwidth -1": lambda p: [d.update(bandwidth_bytes_s=-1) for d in p["cluster"]["devices"]],
    "device compute nan": lambda p: json.dumps(p).replace(
        '"compute_flop_s": ', '"compute_flop_s": NaN, "x": '
    ),
    "bytes_per_token 0": lambda p: _set("options.bytes_per_token", 0)(p),
    "flops_per_token inf": lambda p: json.dumps(p).replace(
        '"flops_per_token": ', '"flops_per_token": Infinity, "x": '
    ),
    "no options": lambda p: p.pop("options"),
    "slots missing": lambda p: p["layers"][0].pop("slots"),
    "slots of another size": lambda p: _set("layers.0.slots", [[[0]]])(p),
    "slots name a device past the cluster": lambda p: _set("layers.0.slots", [[[99]] * 8])(p),
    "binary": lambda p: "\x00\x01",
}
for _name, _change in BAD_PLANS.items():
    CASES.append((f"plan JSON: {_name}", _bad_plan(_change), "bad.json"))


@case("plan JSON given to bench a2a", "bad.json")
def _(d: Path, g: Good) -> list[str]:
    return ["bench", "a2a", "--hosts", "8", "--bandwidth", "1Gbit/s", "--plan", write(d / "bad.json", "{")]


@case("plan JSON missing", "missing.json")
def _(d: Path, g: Good) -> list[str]:
    return ["simulate", "--cluster", g.cluster, "--plan", "missing.json"]


# ---------------------------------------------------------------------------------------------
# traffic matrices (shunter schedule)


def _bad_traffic(make: Callable[[Path], str]) -> Case:
    def build(d: Path, g: Good) -> list[str]:
        return ["schedule", make(d), "--bandwidth", "100Gbit/s"]

    return build


def _matrix(array: object) -> Callable[[Path], str]:
    def make(d: Path) -> str:
        np.save(d / "bad.npy", array)
        return str(d / "bad.npy")

    return make


BAD_TRAFFIC: dict[str, Callable[[Path], str]] = {
    "1e308 entries": _matrix(np.full((4, 4), 1e308)),
    "one 1e308 entry": _matrix(np.array([[0, 1e308], [1e-3, 0]])),
    "2^63 bytes in all": _matrix(np.full((4, 4), 2.0**62)),
    "NaN": _matrix(np.array([[0, np.nan], [1, 0]])),
    "inf": _matrix(np.array([[0, np.inf], [1, 0]])),
    "negative": _matrix(np.array([[0, -1], [1, 0]])),
    "not square": _matrix(np.zeros((2, 3))),
    "1-D": _matrix(np.zeros(4)),
    "empty": _matrix(np.zeros((0, 0))),
    "strings": _matrix(np.array([["a", "b"], ["c", "d"]])),
    "complex": _matrix(np.zeros((2, 2), complex)),
    "an .npz archive": lambda d: save_npz(d / "bad.npy", a=np.zeros((2, 2))),
    "empty file": lambda d: write(d / "bad.npy", b""),
    "text": lambda d: write(d / "bad.npy", "1 2\n3 4\n"),
    "a pickled object": lambda d: (
        np.save(d / "bad.npy", np.array([{}], dtype=object), allow_pickle=True),
        str(d / "bad.npy"),
    )[1],
}
for _name, _make in BAD_TRAFFIC.items():
    CASES.append((f"traffic matrix: {_name}", _bad_traffic(_make), "bad.npy"))
CASES.append(("traffic matrix missing", _bad_traffic(lambda d: "missing.npy"), "missing.npy"))


# ---------------------------------------------------------------------------------------------
# checkpoints, configs and tokenizers (the built-in model, broken one way at a time)


def _bad_model(breaks: Callable[[Path], None], command: str = "generate") -> Case:
    def build(d: Path, g: Good) -> list[str]:
        model = tiny_copy(d)
        breaks(model)
        if command == "trace":
            write(d / "text.txt", "def f(x):\n    return x\n")
            return ["trace", str(model), "--text", "text.txt", "--out", "t.npz"]
        return ["generate", str(model), "--prompt-ids", "1", "--max-new-tokens", "2"]

    return build


def _edit_config(**changes: object) -> Callable[[Path], None]:
    def breaks(model: Path) -> None:
        config = json.loads((model / "config.json").read_text())
        for key, value in changes.items():
            if value is None:
                config.pop(key, None)
            else:
                config[key] = value
        (model / "config.json").write_text(json.dumps(config))

    return breaks


def _retensor(change: Callable[[dict], dict]) -> Callable[[Path], None]:
    """Rewrite model.safetensors with `change` applied to its tensors."""

    def breaks(model: Path) -> None:
        from safetensors.torch import load_file, save_file

        tensors = load_file(model / "model.safetensors")
        save_file(change(tensors), model / "model.safetensors")

    return breaks


def _first(name_part: str) -> Callable[[dict], str]:
    return lambda tensors: next(n for n in sorted(tensors) if name_part in n)


def _cast(name_part: str, dtype: object) -> Callable[[dict], dict]:
    def change(tensors: dict) -> dict:
        name = _first(name_part)(tensors)
        tensors[name] = tensors[name].to(dtype)
        return tensors

    return change


def _nan(name_part: str) -> Callable[[dict], dict]:
    def change(tensors: dict) -> dict:
        name = _first(name_part)(tensors)
        tensors[name] = tensors[name].float().fill_(float("nan")).to(tensors[name].dtype)
        return tensors

    return change


def _header_lies(model: Path) -> None:
    """A header whose offsets run past the end of the data: safetensors' own checks catch it."""
    path = model / "model.safetensors"
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + size])
    name = next(n for n in header if n != "__metadata__")
    header[name]["data_offsets"][1] += 4
    encoded = json.dumps(header).encode()
    encoded += b" " * ((8 - len(encoded) % 8) % 8)
    path.write_bytes(len(encoded).to_bytes(8, "little") + encoded + raw[8 + size :])


def _index_outside(model: Path) -> None:
    (model / "model.safetensors").rename(model / "shard.safetensors")
    from safetensors import safe_open

    with safe_open(str(model / "shard.safetensors"), "pt") as f:
        names = list(f.keys())
    weight_map = {name: "../../outside.safetensors" for name in names}
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


BAD_MODELS: dict[str, Callable[[Path], None]] = {
    "config.json missing": lambda m: (m / "config.json").unlink(),
    "config.json not JSON": lambda m: write(m / "config.json", "{"),
    "config.json a list": lambda m: write(m / "config.json", "[]"),
    "config.json binary": lambda m: write(m / "config.json", b"\xff\xfe"),
    "hidden_size missing": _edit_config(hidden_size=None),
    "hidden_size a string": _edit_config(hidden_size="256"),
    "hidden_size -1": _edit_config(hidden_size=-1),
    "hidden_size of another model": _edit_config(hidden_size=128),
    "num_hidden_layers 0": _edit_config(num_hidden_layers=0),
    "num_local_experts 0": _edit_config(num_local_experts=0),
    "top-k above the experts": _edit_config(num_experts_per_tok=9),
    "vocab_size 2": _edit_config(vocab_size=2),
    "rms_norm_eps nan": lambda m: write(
        m / "config.json",
        (m / "config.json").read_text().replace('"rms_norm_eps": 1e-05', '"rms_norm_eps": NaN'),
    ),
    "unknown model_type": _edit_config(model_type="gpt9", architectures=["Gpt9"]),
    "no weights": lambda m: (m / "model.safetensors").unlink(),
    "weights empty": lambda m: write(m / "model.safetensors", b""),
    "weights truncated": lambda m: write(
        m / "model.safetensors", (m / "model.safetensors").read_bytes()[:1000]
    ),
    "weights random bytes": lambda m: write(m / "model.safetensors", bytes(range(256)) * 64),
    "weight header lies about offsets": _header_lies,
    "a weight in int32": _retensor(_cast("embed", torch.int32)),
    "a weight in bool": _retensor(_cast("norm", torch.bool)),
    "a weight NaN": _retensor(_nan("embed")),
    "a tensor missing": _retensor(lambda t: {k: v for k, v in t.items() if k != _first("norm")(t)}),
    "shard index points outside the model": _index_outside,
    "shard index not JSON": lambda m: write(m / "model.safetensors.index.json", "{"),
    "tokenizer.json not JSON": lambda m: write(m / "tokenizer.json", "{"),
}
for _name, _breaks in BAD_MODELS.items():
    CASES.append((f"checkpoint: {_name}", _bad_model(_breaks), "model"))
for _name in ("config.json not JSON", "weights truncated", "a weight in int32", "tokenizer.json not JSON"):
    CASES.append((f"checkpoint for trace: {_name}", _bad_model(BAD_MODELS[_name], "trace"), "model"))
CASES.append(
    (
        "checkpoint: a model directory that does not exist",
        lambda d, g: ["generate", "./nomodel", "--prompt-ids", "1"],
        "nomodel",
    )
)


# ---------------------------------------------------------------------------------------------
# train --config TOML


def _train_config(text: str | bytes) -> Case:
    def build(d: Path, g: Good) -> list[str]:
        return ["train", "--out", "m", "--config", write(d / "bad.toml", text)]

    return build


for _name, _text in {
    "not TOML": "lr = ",
    "binary": b"\xff\xfe",
    "unknown key": "learning_rate = 1\n",
    "lr nan": "lr = nan\n",
    "lr -1": "lr = -1.0\n",
    "lr a string": 'lr = "fast"\n',
    "vocab_size 2": "vocab_size = 2\n",
    "steps a float": "steps = 2.5\n",
    "seed -1": "seed = -1\n",
    "a table": "[model]\nlr = 1\n",
}.items():
    CASES.append((f"train config: {_name}", _train_config(_text), "bad.toml"))
CASES.append(
    ("train config missing", lambda d, g: ["train", "--out", "m", "--config", "missing.toml"], "missing.toml")
)


# ---------------------------------------------------------------------------------------------
# parametrized runner


@pytest.mark.parametrize("build, expect", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_refused_in_one_line(build: Case, expect: str, good: Good, tmp_path: Path) -> None:
    argv = build(tmp_path, good)
    line = refused(argv, tmp_path)
    assert expect in line, line
