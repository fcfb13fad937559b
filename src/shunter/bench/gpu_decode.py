"""Decode on one GPU beside llama.cpp built for CUDA (issue 19's GPU table).

    python -m shunter.bench.gpu_decode --work DIR --llama-bin DIR --convert DIR --out RESULT.json

Mixtral-8x7B's layer shapes (hidden 4096, 8 experts of 14336, top-2, 32/8 heads, vocab 32000)
with random weights, `--layers` of its 32 layers, at three precisions: Shunter's bf16 checkpoint
and its `quantize_checkpoint` 8- and 4-bit copies (attention and LM head too, as the CPU table's),
beside the same bf16 weights converted to GGUF and `llama-quantize`d to Q8_0 and Q4_0.

Two conditions per precision:
  in memory  every weight on the GPU: Shunter's in-memory executor on cuda, llama.cpp -ngl 99.
  budget     --budget bytes of GPU memory (default 24 GB x layers / 32: what a 24 GB card is to
             the whole model), the rest in host RAM. Shunter: the offload engine with --memory
             budget, every other weight in pinned host RAM, streamed over PCIe. llama.cpp: as its
             users run a MoE on a small card, -ngl 99 with the expert tensors that do not fit the
             budget kept on the CPU (`-ot NAME=CPU`), which computes them there.

Rounds: per precision (one after the other, in --precisions' order) and condition, one Shunter
process and one llama-batched-bench process (their order alternating round by round), each
running every S of --sequences on one load
(every sequence its own random 16-token prompt); median of the rounds after --warmup. The
results file is rewritten after every run, so a run stopped at --deadline-s keeps what it has.
`--tiny --device cpu` runs the whole thing with small shapes on a CPU (the script's own check).

One room, though long: preparing the pair of models, the two contenders' runs and the rounds
that alternate them are one benchmark and change together.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from shunter.bench.llama import batched_bench_argv, parse_batched_bench
from shunter.bench.workers import PROMPT_TOKENS, prompts
from shunter.errors import ShunterError

CONDITIONS = ("in memory", "budget")
LLAMA_RESERVE_BYTES = 512 * 2**20  # llama.cpp's KV cache and compute buffers inside the budget
EXPERT_TENSOR = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down)_exps\.weight$")
PRECISIONS = {"bf16": ("bf16", None, None), "8-bit": ("Q8_0", 8, "q8"), "4-bit": ("Q4_0", 4, "q4")}


@dataclass(frozen=True)
class Shapes:
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    experts: int = 8
    top_k: int = 2


MIXTRAL_8X7B_LAYER = Shapes(hidden=4096, intermediate=14336, heads=32, kv_heads=8, vocab=32000)
TINY = Shapes(hidden=256, intermediate=512, heads=8, kv_heads=2, vocab=4096)


# ---------------------------------------------------------------------------------------------
# pure parts


def llama_cpu_tensors(tensors: list[tuple[str, int]], budget_bytes: int, reserve_bytes: int) -> list[str]:
    """The expert tensors llama.cpp keeps on the CPU under a GPU budget. tensors: (GGUF name,
    bytes). Every tensor but the token embedding (llama.cpp looks it up on the CPU) and the expert
    tensors goes to the GPU (-ngl 99); then expert tensors, layer by layer (gate, up, down), while
    they fit in budget - reserve; the rest stay on the CPU. Raises ValueError when not even the
    dense tensors fit."""
    experts, dense = [], 0
    for name, size in tensors:
        match = EXPERT_TENSOR.match(name)
        if match:
            experts.append((int(match[1]), ("gate", "up", "down").index(match[2]), name, size))
        elif name != "token_embd.weight":
            dense += size
    room = budget_bytes - reserve_bytes - dense
    if room < 0:
        raise ValueError(
            f"budget {budget_bytes} B: dense tensors {dense} B + reserve {reserve_bytes} B exceed it"
        )
    on_cpu = []
    for _, _, name, size in sorted(experts):
        if size <= room and not on_cpu:  # whole layers first: stop at the first that does not fit
            room -= size
        else:
            on_cpu.append(name)
    return on_cpu


def override_argument(cpu_tensors: list[str]) -> list[str]:
    """llama.cpp's -ot argument keeping these tensors in host memory (none: no argument)."""
    if not cpu_tensors:
        return []
    pattern = "|".join("^" + re.escape(name) + "$" for name in cpu_tensors)
    return ["-ot", f"{pattern}=CPU"]


def summarize(runs: list[dict[str, Any]], warmup: int) -> list[dict[str, Any]]:
    """Per (precision, condition, S): each contender's median decode tok/s over the rounds after
    the warm-up ones (min and max beside it), and Shunter / llama.cpp."""
    points: dict[tuple[str, str, int], dict[str, list[float]]] = {}
    for run in runs:
        if run["round"] < warmup:
            continue
        for S, rate in run.get("decode_tok_s", {}).items():
            key = (run["precision"], run["condition"], int(S))
            points.setdefault(key, {}).setdefault(run["contender"], []).append(rate)
    rows = []
    for (precision, condition, S), by in sorted(points.items()):
        row: dict[str, Any] = {"precision": precision, "condition": condition, "sequences": S}
        for contender in ("shunter", "llama.cpp"):
            rates = by.get(contender, [])
            row[contender] = (
                {"median": statistics.median(rates), "min": min(rates), "max": max(rates), "runs": len(rates)}
                if rates
                else None
            )
        a, b = row["shunter"], row["llama.cpp"]
        row["ratio"] = a["median"] / b["median"] if a and b and b["median"] > 0 else None
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------
# the Shunter contender, in its own process


def shunter_worker(job: dict[str, Any]) -> dict[str, Any]:
    """Every S of job["sequences"] on one load: in memory on job["device"], or the offload
    engine under job["budget_bytes"] with the rest in host RAM (its placement sized for the
    largest S; micro-batches min(S, 8) per S)."""
    import torch

    from shunter.model.generate import generate
    from shunter.model.loader import load_model
    from shunter.model.spec import load_spec
    from shunter.offload import PipelineOptions, load_offloaded

    path, device, sequences = Path(job["model"]), torch.device(job["device"]), job["sequences"]
    spec = load_spec(path)
    started = time.perf_counter()
    if job["condition"] == "in memory":
        model = load_model(path, device=device).model
        close = lambda: None
    else:
        options = PipelineOptions(num_batches=min(max(sequences), 8))
        model = load_offloaded(
            path, job["budget_bytes"], options=options, sequences=max(sequences),
            max_slots=PROMPT_TOKENS + job["new_tokens"], device=device, host_memory_bytes=job["host_bytes"],
        )  # fmt: skip
        close = model.close
    load_s = time.perf_counter() - started
    result: dict[str, Any] = {"load_s": load_s, "decode_tok_s": {}, "prefill_tok_s": {}}
    try:
        for S in sequences:
            if job["condition"] == "budget":
                model.options = replace(model.options, num_batches=min(S, 8))
            run = generate(model, prompts(S, spec.vocab_size), job["new_tokens"])
            result["decode_tok_s"][str(S)] = run.decode_tok_s
            result["prefill_tok_s"][str(S)] = run.prefill_tok_s
        if job.get("profile") and device.type == "cuda":
            result["profile"] = profile_decode(model, spec.vocab_size)
        if job["condition"] == "budget":
            result["resident_experts"] = len(model.placement.resident_experts)
            result["host_experts"] = len(model.placement.host_experts)
            result["expert_loads"] = model.streamer.expert_loads
    finally:
        close()
    if device.type == "cuda":
        result["peak_gpu_bytes"] = torch.cuda.max_memory_allocated(device)
    return result


def profile_decode(model: Any, vocab_size: int, new_tokens: int = 5) -> dict[str, Any]:
    """Where one sequence's decode time goes on the GPU: wall time against the kernels' summed time
    per step, launches per step, and the ops that take most of the kernels' time."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from shunter.model.generate import generate

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run = generate(model, prompts(1, vocab_size), new_tokens)
    events = prof.key_averages()
    kernel_s = sum(e.self_device_time_total for e in events) / 1e6
    launches = sum(e.count for e in events if e.key.startswith(("cudaLaunchKernel", "cuLaunchKernel")))
    top = sorted(events, key=lambda e: e.self_device_time_total, reverse=True)[:12]
    steps = run.decode_steps + 1  # the prompt's forward too
    return {
        "wall_s_per_step": (run.prefill_s + run.decode_s) / steps,
        "kernel_s_per_step": kernel_s / steps,
        "launches_per_step": launches / steps,
        "top_ops": [(e.key, e.self_device_time_total / 1e3 / steps, e.count // steps) for e in top],
        "torch": torch.__version__,
    }


# ---------------------------------------------------------------------------------------------
# preparing the models


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def build_checkpoint(out: Path, layers: int, shapes: Shapes, device: str) -> None:
    from shunter.model.export import mixtral_config, random_weights, save_checkpoint
    from shunter.model.loader import BUILTIN_ROOT
    from shunter.model.spec import spec_from_config

    config = mixtral_config(
        vocab_size=shapes.vocab, hidden_size=shapes.hidden, num_layers=layers, num_heads=shapes.heads,
        num_kv_heads=shapes.kv_heads, num_experts=shapes.experts, top_k=shapes.top_k,
        intermediate_size=shapes.intermediate, rope_theta=1e6, dtype="bfloat16", eos_token_id=0,
    )  # fmt: skip
    # routers at std 0.05: sharpened, as bench/offload.py builds them
    weights = random_weights(spec_from_config(config), seed=0, std=0.02, router_std=0.05, device=device)
    save_checkpoint(config, weights, out, tokenizer_json=BUILTIN_ROOT / "shunter-tiny" / "tokenizer.json")


def prepare(args: argparse.Namespace, names: list[str]) -> dict[str, tuple[Path, Path]]:
    """{precision: (Shunter checkpoint, GGUF file)}, built where missing."""
    from shunter.model.quantize_checkpoint import quantize_checkpoint

    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    bf16 = work / "shunter-bf16"
    if not (bf16 / "config.json").is_file():
        _log(f"building the {args.layers}-layer checkpoint")
        build_checkpoint(bf16, args.layers, TINY if args.tiny else MIXTRAL_8X7B_LAYER, args.device)
    gguf_bf16 = work / "llama-bf16.gguf"
    convert = None
    if not gguf_bf16.is_file():
        _log("converting to GGUF bf16 (in the background)")
        env = dict(os.environ, PYTHONPATH=str(args.convert / "gguf-py"))
        script = str(args.convert / "convert_hf_to_gguf.py")
        with open(work / "convert.log", "w") as log:  # the child keeps its own copy of the descriptor
            convert = subprocess.Popen(
                [sys.executable, script, str(bf16), "--outtype", "bf16", "--outfile", str(gguf_bf16)],
                env=env, stdout=subprocess.DEVNULL, stderr=log,
            )  # fmt: skip
    pairs = {"bf16": (bf16, gguf_bf16)}
    for name in names:
        llama_type, bits, short = PRECISIONS[name]
        if bits is None:
            continue
        ours = work / f"shunter-{short}"
        if not (ours / "config.json").is_file():
            _log(f"quantising Shunter's {name} copy")
            quantize_checkpoint(bf16, ours, bits, include=("attention", "lm_head"), device=args.device)
        pairs[name] = (ours, work / f"llama-{llama_type}.gguf")
    if convert is not None and convert.wait() != 0:
        raise SystemExit(f"convert_hf_to_gguf.py failed; see {work / 'convert.log'}")
    for name in names:
        llama_type = PRECISIONS[name][0]
        gguf = pairs[name][1]
        if name != "bf16" and not gguf.is_file():
            _log(f"llama-quantize {llama_type}")
            binary = str(args.llama_bin / "llama-quantize")
            with open(work / f"quantize-{llama_type}.log", "w") as log:
                subprocess.run(
                    [binary, str(gguf_bf16), str(gguf), llama_type, str(args.threads)],
                    check=True, stdout=subprocess.DEVNULL, stderr=log,
                )  # fmt: skip
    return {name: pairs[name] for name in names}


def directory_bytes(model_dir: Path) -> int:
    return sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))


def gguf_tensors(gguf: Path, convert: Path) -> list[tuple[str, int]]:
    sys.path.insert(0, str(convert / "gguf-py"))
    from gguf import GGUFReader

    return [(t.name, int(t.n_bytes)) for t in GGUFReader(str(gguf)).tensors]


# ---------------------------------------------------------------------------------------------
# the rounds


def run_shunter(job: dict[str, Any], work: Path, timeout_s: float) -> dict[str, Any]:
    job_file, result_file = work / "job.json", work / "result.json"
    job_file.write_text(json.dumps(job))
    result_file.unlink(missing_ok=True)
    done = subprocess.run(
        [sys.executable, "-m", "shunter.bench.gpu_decode", "worker", str(job_file), str(result_file)],
        capture_output=True, text=True, timeout=timeout_s,
    )  # fmt: skip
    if done.returncode != 0:
        return {"error": done.stderr[-2000:]}
    return json.loads(result_file.read_text())


def gpu_memory_poll() -> subprocess.Popen | None:
    """nvidia-smi printing the GPU's used memory (MiB) every 200 ms, or None without one. llama.cpp
    says where its buffers went only at a log level that also loses its results, so the card's
    own count is the check that its CUDA build held weights on the GPU."""
    try:
        return subprocess.Popen(
            ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-lms", "200"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )  # fmt: skip
    except OSError:
        return None


def peak_used_mib(poll: subprocess.Popen | None) -> int | None:
    if poll is None:
        return None
    poll.terminate()
    values = [int(v) for v in poll.communicate()[0].split() if v.isdigit()]
    return max(values) if values else None


def run_llama(argv: list[str], sequences: list[int], timeout_s: float, gpu: bool) -> dict[str, Any]:
    started = time.perf_counter()
    poll = gpu_memory_poll() if gpu else None
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s)
    finally:
        peak = peak_used_mib(poll)
    log = done.stdout + done.stderr
    if done.returncode != 0:
        return {"error": log[-2000:]}
    result: dict[str, Any] = {
        "wall_s": time.perf_counter() - started,
        "decode_tok_s": {},
        "prefill_tok_s": {},
    }
    for S in sequences:
        try:
            point = parse_batched_bench(log, S)
        except ShunterError as exc:  # the points it did print still count
            result["error"] = f"{exc}; its output ended: {log[-1500:]}"
            continue
        result["decode_tok_s"][str(S)] = point["decode_tok_s"]
        result["prefill_tok_s"][str(S)] = point["prefill_tok_s"]
    result["gpu_used_peak_mib"] = peak
    # what it said of the GPU and of where its layers went: the check that a CUDA build used the GPU
    said = [line for line in log.splitlines() if re.search(r"CUDA|cuda|offload|buffer size", line)]
    result["gpu_log"] = said[:24]
    return result


def llama_argv(args: argparse.Namespace, gguf: Path, cpu_tensors: list[str], budget: bool) -> list[str]:
    argv = batched_bench_argv(
        str(args.llama_bin / "llama-batched-bench"), str(gguf), max(args.sequences), PROMPT_TOKENS,
        args.new_tokens, args.threads,
    )  # fmt: skip
    # the smallest point again at the end: llama.cpp prints through a logging thread that now and
    # then loses the last line at exit (seen here: 4 of 24 runs lacked their last point), and the
    # first line of each S is the one read
    points = [*args.sequences, min(args.sequences)]
    argv[argv.index("-npl") + 1] = ",".join(str(S) for S in points)
    # room for the largest point with margin: with several -npl points on one context llama.cpp
    # rounds each sequence's share down and skipped the 64-sequence point at the exact size
    argv[argv.index("-c") + 1] = str(2 * max(args.sequences) * (PROMPT_TOKENS + args.new_tokens) + 256)
    gpu_layers = ["-ngl", "99"] if args.device != "cpu" else []
    # llama.cpp copies CPU-held weights to the GPU for batches of 32+ tokens (its op offload), past
    # any budget: 33 GB of GPU memory under a 3 GB one, measured; --llama-strict-budget forbids it
    strict = ["--no-op-offload"] if budget and args.llama_strict_budget else []
    return argv + gpu_layers + override_argument(cpu_tensors) + strict


def main_run(args: argparse.Namespace) -> int:
    deadline = time.monotonic() + args.deadline_s
    names = args.precisions
    report: dict[str, Any] = {
        "layers": args.layers, "shapes": "tiny" if args.tiny else "Mixtral-8x7B layers",
        "budget_bytes": args.budget, "llama_reserve_bytes": args.llama_reserve, "host_bytes": args.host_bytes,
        "llama_strict_budget": args.llama_strict_budget,
        "threads": args.threads,
        "sequences": args.sequences, "new_tokens": args.new_tokens, "prompt_tokens": PROMPT_TOKENS,
        "warmup": args.warmup, "device": args.device, "runs": [], "steps_s": {},
    }  # fmt: skip
    started = time.perf_counter()
    pairs = prepare(args, names)
    report["steps_s"]["prepare"] = time.perf_counter() - started
    report["files"] = {
        name: {"shunter": str(ours), "shunter_bytes": directory_bytes(ours),
               "gguf": str(gguf), "gguf_bytes": gguf.stat().st_size}
        for name, (ours, gguf) in pairs.items()
    }  # fmt: skip
    cpu_tensors = {
        name: llama_cpu_tensors(gguf_tensors(gguf, args.convert), args.budget, args.llama_reserve)
        for name, (_, gguf) in pairs.items()
    }
    report["llama_cpu_tensors"] = cpu_tensors
    out: Path = args.out

    def save() -> None:
        report["rows"] = summarize(report["runs"], args.warmup)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(report, indent=1))
        tmp.replace(out)

    save()
    # precision by precision, in the order given, so that a run stopped at its deadline has whole
    # rounds of the first ones; the contenders alternate within every round and condition
    for name, (ours, gguf) in pairs.items():
        for round_ in range(args.warmup + args.reps):
            for condition in CONDITIONS:
                order = ("shunter", "llama.cpp") if round_ % 2 == 0 else ("llama.cpp", "shunter")
                for contender in order:
                    left = deadline - time.monotonic()
                    if left < 5:
                        _log("deadline reached: stopping the rounds")
                        report["stopped_at_deadline"] = True
                        save()
                        return 0
                    run: dict[str, Any] = {"round": round_, "precision": name, "condition": condition,
                                           "contender": contender}  # fmt: skip
                    try:
                        if contender == "shunter":
                            job = {"model": str(ours), "condition": condition, "device": args.device,
                                   "profile": round_ == args.warmup,
                                   "sequences": args.sequences, "new_tokens": args.new_tokens,
                                   "budget_bytes": args.budget, "host_bytes": args.host_bytes}  # fmt: skip
                            run |= run_shunter(job, args.work, min(left, 3600))
                        else:
                            on_cpu = cpu_tensors[name] if condition == "budget" else []
                            argv = llama_argv(args, gguf, on_cpu, condition == "budget")
                            run |= run_llama(argv, args.sequences, min(left, 3600), args.device != "cpu")
                    except subprocess.TimeoutExpired:
                        run["error"] = "stopped at the deadline"
                    rates = run.get("decode_tok_s", {})
                    _log(
                        f"round {round_} {name} {condition} {contender}: "
                        + (
                            ", ".join(f"S={S} {r:.1f}" for S, r in rates.items())
                            or run.get("error", "")[-300:]
                        )
                    )
                    report["runs"].append(run)
                    save()
    return 0


def print_rows(report: dict[str, Any]) -> None:
    print(f"{'precision':<9} {'condition':<10} {'S':>3} {'shunter':>10} {'llama.cpp':>10} {'ratio':>7}")
    for row in report["rows"]:
        a, b = row["shunter"], row["llama.cpp"]
        fa = f"{a['median']:.1f}" if a else "-"
        fb = f"{b['median']:.1f}" if b else "-"
        ratio = f"{row['ratio']:.2f}x" if row["ratio"] else "-"
        print(
            f"{row['precision']:<9} {row['condition']:<10} {row['sequences']:>3} {fa:>10} {fb:>10} {ratio:>7}"
        )


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m shunter.bench.gpu_decode", description=__doc__.split("\n")[0])
    p.add_argument("--work", type=Path, required=True, help="directory for the checkpoints and GGUF files")
    p.add_argument("--llama-bin", type=Path, required=True, help="llama.cpp's build/bin")
    p.add_argument(
        "--convert", type=Path, required=True, help="llama.cpp's source tree (convert_hf_to_gguf.py)"
    )
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--budget", type=float, default=None, help="GPU bytes (default 24e9 x layers / 32)")
    p.add_argument(
        "--llama-reserve", type=float, default=LLAMA_RESERVE_BYTES, help="llama.cpp's KV and compute buffers"
    )
    p.add_argument(
        "--llama-strict-budget",
        action="store_true",
        help="llama.cpp under the budget without its op offload (which copies CPU-held weights to the GPU)",
    )
    p.add_argument("--host-bytes", type=float, default=100e9, help="host RAM for Shunter's host tier")
    p.add_argument("--precisions", default="bf16,8-bit,4-bit")
    p.add_argument("--sequences", default="1,8,64")
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--device", default="cuda")
    p.add_argument("--deadline-s", type=float, default=1e9, help="start no run after this many seconds")
    p.add_argument("--tiny", action="store_true", help="small shapes: the script's own check on a CPU")
    args = p.parse_args(argv)
    args.precisions = [name.strip() for name in args.precisions.split(",")]
    unknown = [name for name in args.precisions if name not in PRECISIONS]
    if unknown:
        p.error(f"--precisions: unknown {unknown[0]!r}; choose from {', '.join(PRECISIONS)}")
    args.sequences = [int(S) for S in args.sequences.split(",")]
    args.budget = int(args.budget if args.budget is not None else 24e9 * args.layers / 32)
    args.host_bytes, args.llama_reserve = int(args.host_bytes), int(args.llama_reserve)
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["worker"]:
        job_file, result_file = argv[1:3]
        result = shunter_worker(json.loads(Path(job_file).read_text()))
        Path(result_file).write_text(json.dumps(result))
        return 0
    args = parse_args(argv)
    code = main_run(args)
    print_rows(json.loads(args.out.read_text()))
    return code


if __name__ == "__main__":
    sys.exit(main())
