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
# parametrized runner


@pytest.mark.parametrize("build, expect", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_refused_in_one_line(build: Case, expect: str, good: Good, tmp_path: Path) -> None:
    argv = build(tmp_path, good)
    line = refused(argv, tmp_path)
    assert expect in line, line
