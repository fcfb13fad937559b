"""`shunter bench serve`: streaming OpenAI clients against servers, concurrency level by level.

At each level C, C clients each send `requests_per_client` streamed completions one after another
(prompts as token ids, independent windows of the built-in model's held-out tokens, so every
server sees the same tokens; a fixed output length with `ignore_eos`). A run reports output tokens
per second over its wall time, time to first token and inter-token latency (p50, p95).

Contenders, each started afresh for every level (in a fresh memory cgroup of `cap_bytes` with the
page cache dropped first, when capped):
  shunter        `shunter serve --max-sequences C` (continuous batching), its own process;
  one-at-a-time  the same with `--max-sequences 1`;
  llama-server   llama.cpp's server, `-np C` parallel slots, `-t/-tb threads`;
  peer           any OpenAI server given by URL (not started, not capped);
  generate       at level 1 only: `shunter generate` on the level's first prompt, a process per run.
Within a level the contenders run interleaved, round by round (warm-up rounds first), each round
with its own prompts (the same for every contender), so a slow minute of the disk hits all alike
and no server answers from a prompt cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from shunter.errors import ShunterError

SERVER_START_TIMEOUT_S = 300  # loading a model (and, offloaded, measuring the machine) takes a while
IDLE_TIMEOUT_S = 120  # a server still busy this long after its clients left is reported, not waited on
SERVER_CONTENDERS = ("shunter", "one-at-a-time", "llama-server", "peer")
CONTENDERS = (*SERVER_CONTENDERS, "generate")
CONTEXT_MARGIN_TOKENS = 8  # each sequence's context beyond prompt + max_tokens (BOS, rounding)


@dataclass(frozen=True)
class ServeBenchConfig:
    concurrency: tuple[int, ...] = (1, 4, 16, 64)
    max_tokens: int = 32  # every completion's length (ignore_eos)
    prompt_tokens: int = 32  # held-out token ids per prompt
    requests_per_client: int = 2
    request_timeout_s: float = 600.0
    contenders: tuple[str, ...] = ("shunter",)
    reps: int = 1  # timed rounds per level; the report's figures are their medians
    warmup: int = 0  # untimed rounds first, per level
    max_run_s: float | None = None  # a run stops here; the tokens streamed so far count
    model: str = "shunter-tiny"
    memory: str | None = None  # shunter serve's and shunter generate's --memory
    max_sequences: int | None = None  # shunter's rows (default: the level's concurrency)
    cap_bytes: int | None = None  # every started process's memory cgroup (None: uncapped)
    peer_url: str | None = None
    llama_server: str | None = None
    gguf: str | None = None
    threads: int = 2  # llama-server's -t and -tb

    @property
    def context_tokens(self) -> int:
        return self.prompt_tokens + self.max_tokens + CONTEXT_MARGIN_TOKENS


@dataclass
class RequestTiming:
    ttft_s: float | None  # None: no token arrived before the run stopped
    gaps_s: list[float]
    output_tokens: int
    finished: bool


@dataclass
class LevelResult:
    """One run of one contender at one level."""

    concurrency: int
    requests: int  # finished
    output_tokens: int  # streamed, finished requests or not
    wall_s: float
    output_tok_s: float
    ttft_p50_s: float | None
    ttft_p95_s: float | None
    itl_p50_s: float | None
    itl_p95_s: float | None
    failed: int = 0
    unfinished: int = 0  # stopped at max_run_s
    errors: list[str] = field(default_factory=list)
    disk_read_bytes: float | None = None  # shunter's /metrics, this run's share
    engine_steps: float | None = None


def held_out_prompt_ids(count: int, prompt_tokens: int, first: int = 0) -> list[list[int]]:
    """`count` independent prompts as token ids: consecutive, non-overlapping windows of the built-in
    model's held-out tokens (its routing trace), starting at window `first` (wrapping around)."""
    from shunter.model.loader import BUILTIN_ROOT, DEFAULT_MODEL, TRACE_FILE
    from shunter.trace import load_trace

    tokens = load_trace(BUILTIN_ROOT / DEFAULT_MODEL / TRACE_FILE).token_ids
    if tokens is None:
        raise ShunterError(
            f"{BUILTIN_ROOT / DEFAULT_MODEL}: the built-in model's held-out tokens are missing"
        )
    windows = len(tokens) // prompt_tokens
    if windows < count:
        raise ShunterError(
            f"--prompt-tokens {prompt_tokens}: the held-out text ({len(tokens)} tokens) has {windows} "
            f"windows, fewer than the {count} distinct prompts a round needs"
        )
    return [
        tokens[w * prompt_tokens : (w + 1) * prompt_tokens].tolist()
        for w in ((first + i) % windows for i in range(count))
    ]


def percentile(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if len(values) else None


async def _one_request(
    client: Any, model: str, prompt: list[int], max_tokens: int, timing: RequestTiming, started: float
) -> None:
    """Stream one completion, filling `timing` as tokens arrive (so a stopped run keeps them)."""
    stream = await client.completions.create(
        model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    )  # fmt: skip
    last, usage = None, None
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage.completion_tokens
        if chunk.choices and chunk.choices[0].text:
            now = time.perf_counter()
            if last is None:
                timing.ttft_s = now - started
            else:
                timing.gaps_s.append(now - last)
            last = now
            timing.output_tokens += 1
    if last is None:
        raise ShunterError("the server streamed no text")
    if usage is not None:  # a chunk may carry several tokens (or one token's text may wait for the next)
        timing.output_tokens = usage
    timing.finished = True


async def run_level(
    base_url: str, model: str, prompts: list[list[int]], concurrency: int, config: ServeBenchConfig
) -> LevelResult:
    """C clients, each sending its requests one after another, prompts[client * R + k]; stopped at
    config.max_run_s (tokens streamed until then count, their requests are `unfinished`)."""
    import openai

    client = openai.AsyncOpenAI(
        base_url=base_url, api_key="unused", max_retries=0, timeout=config.request_timeout_s
    )
    timings: list[RequestTiming] = []
    errors: list[str] = []

    async def one_client(index: int) -> None:
        for k in range(config.requests_per_client):
            timing = RequestTiming(None, [], 0, False)
            timings.append(timing)
            prompt = prompts[(index * config.requests_per_client + k) % len(prompts)]
            try:
                await _one_request(client, model, prompt, config.max_tokens, timing, time.perf_counter())
            except (openai.OpenAIError, ShunterError) as exc:
                errors.append(f"{type(exc).__name__}: {exc}")

    started = time.perf_counter()
    async with client:
        tasks = [asyncio.ensure_future(one_client(i)) for i in range(concurrency)]
        _, pending = await asyncio.wait(tasks, timeout=config.max_run_s)
        for task in pending:  # closing their streams disconnects them: the server frees their rows
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    wall_s = min(time.perf_counter() - started, config.max_run_s or float("inf"))
    ttft = [t.ttft_s for t in timings if t.ttft_s is not None]
    gaps = [g for t in timings for g in t.gaps_s]
    output_tokens = sum(t.output_tokens for t in timings)
    finished = sum(t.finished for t in timings)
    return LevelResult(
        concurrency=concurrency,
        requests=finished,
        output_tokens=output_tokens,
        wall_s=wall_s,
        output_tok_s=output_tokens / wall_s if wall_s > 0 else 0.0,
        ttft_p50_s=percentile(ttft, 50),
        ttft_p95_s=percentile(ttft, 95),
        itl_p50_s=percentile(gaps, 50),
        itl_p95_s=percentile(gaps, 95),
        failed=len(errors),
        unfinished=concurrency * config.requests_per_client - finished - len(errors),
        errors=errors[:3],
    )


# ---------------------------------------------------------------------------------------------
# servers: started in their own process (capped: in a fresh memory cgroup), torn down after a level


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class StartedServer:
    base_url: str  # .../v1
    process: subprocess.Popen | None  # None: a peer given by URL
    cgroup: Path | None
    peak_rss_bytes: int | None = None  # VmHWM of the server process, read before it is stopped
    peak_cgroup_bytes: int | None = None  # memory.max_usage_in_bytes: processes + page cache


def _python_env() -> dict[str, str]:
    """This interpreter's import path for child processes (an editable or PYTHONPATH=src run)."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p and Path(p).is_dir()))


@contextlib.contextmanager
def _capped_process(
    argv: list[str], cap_bytes: int | None, log: TextIO, env: dict[str, str] | None = None
) -> Iterator[tuple[subprocess.Popen, Path | None]]:
    """argv in its own process; capped: the page cache dropped first and the process in a fresh
    memory cgroup of cap_bytes from before its exec (everything it maps counts). Stopped on exit."""
    with contextlib.ExitStack() as stack:
        group = None
        preexec = None
        if cap_bytes is not None:
            from shunter.bench.sandbox import drop_page_cache, memory_cgroup

            drop_page_cache()
            group = stack.enter_context(memory_cgroup(cap_bytes))
            procs = str(group / "cgroup.procs")

            def preexec() -> None:
                with open(procs, "w") as f:
                    f.write(str(os.getpid()))

        process = subprocess.Popen(argv, stdout=log, stderr=log, env=env, preexec_fn=preexec)
        try:
            yield process, group
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _peak_rss(pid: int) -> int | None:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return None


def _cgroup_peak(group: Path | None) -> int | None:
    if group is None:
        return None
    with contextlib.suppress(OSError, ValueError):
        return int((group / "memory.max_usage_in_bytes").read_text())
    return None


def _wait_healthy(process: subprocess.Popen, url: str, what: str, group: Path | None) -> None:
    import httpx

    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while True:
        if process.poll() is not None:
            peak = _cgroup_peak(group)
            at_cap = f" (cgroup peak {peak} bytes: killed at the cap?)" if peak else ""
            raise ShunterError(f"{what} exited with status {process.returncode} before serving{at_cap}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        if time.monotonic() > deadline:
            raise ShunterError(f"{what} did not answer {url} within {SERVER_START_TIMEOUT_S} s")
        time.sleep(0.2)


def server_argv(name: str, concurrency: int, port: int, config: ServeBenchConfig) -> list[str]:
    """The command line that starts contender `name` for a level of `concurrency` clients."""
    if name == "llama-server":
        return [
            str(config.llama_server), "-m", str(config.gguf), "--host", "127.0.0.1", "--port", str(port),
            "-t", str(config.threads), "-tb", str(config.threads), "-np", str(concurrency),
            "-c", str(concurrency * config.context_tokens),
            # its host-RAM prompt cache serves no distinct prompt, and under a cap takes the page cache's room
            "--cache-ram", "0",
        ]  # fmt: skip
    rows = 1 if name == "one-at-a-time" else config.max_sequences or concurrency
    argv = [
        sys.executable, "-m", "shunter", "serve", config.model, "--port", str(port),
        "--max-sequences", str(rows), "--max-queue", str(2 * concurrency * config.requests_per_client),
        "--max-context", str(config.context_tokens),
    ]  # fmt: skip
    return argv + (["--memory", config.memory] if config.memory else [])


@contextlib.contextmanager
def started_server(
    name: str, concurrency: int, config: ServeBenchConfig, log: TextIO
) -> Iterator[StartedServer]:
    """Contender `name` serving a level of `concurrency` clients; yields once /health answers, and
    records its peak memory before stopping it."""
    if name == "peer":
        yield StartedServer(str(config.peer_url).rstrip("/"), None, None)
        return
    port = _free_port()
    argv = server_argv(name, concurrency, port, config)
    env = None if name == "llama-server" else _python_env()
    with _capped_process(argv, config.cap_bytes, log, env) as (process, group):
        _wait_healthy(process, f"http://127.0.0.1:{port}/health", f"{name} ({' '.join(argv[:1])})", group)
        server = StartedServer(f"http://127.0.0.1:{port}/v1", process, group)
        try:
            yield server
        finally:
            server.peak_rss_bytes = _peak_rss(process.pid)
            server.peak_cgroup_bytes = _cgroup_peak(group)


def _served_model(base_url: str) -> str:
    """The first model the server lists (llama-server and vLLM want a name they know)."""
    import httpx

    try:
        data = httpx.get(base_url.rstrip("/") + "/models", timeout=10).json()["data"]
        return str(data[0]["id"])
    except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError):
        return "default"


_METRIC_LINE = re.compile(r"^(shunter_disk_read_bytes_total|shunter_engine_steps_total) ([0-9.e+]+)$", re.M)


def _engine_counters(base_url: str) -> dict[str, float]:
    """Shunter's bytes read and engine steps so far (empty for a server without those metrics)."""
    import httpx

    with contextlib.suppress(httpx.HTTPError):
        text = httpx.get(base_url.removesuffix("/v1") + "/metrics", timeout=10).text
        return {name: float(value) for name, value in _METRIC_LINE.findall(text)}
    return {}


def _wait_idle(base_url: str) -> None:
    """Until a stopped run's requests have left the server: Shunter's /health counts them,
    llama-server's /slots shows them; other servers get a second."""
    import httpx

    root = base_url.removesuffix("/v1")
    deadline = time.monotonic() + IDLE_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            health = httpx.get(root + "/health", timeout=5).json()
            if "active_sequences" in health:
                busy = health["active_sequences"] + health["queued_requests"] > 0
            else:
                slots = httpx.get(root + "/slots", timeout=5)
                if slots.status_code != 200:
                    time.sleep(1.0)
                    return
                busy = any(slot.get("is_processing") for slot in slots.json())
        except (httpx.HTTPError, ValueError, TypeError, AttributeError):
            time.sleep(1.0)
            return
        if not busy:
            return
        time.sleep(0.2)
    print(f"bench serve: warning: {root} still busy {IDLE_TIMEOUT_S} s after its run", file=sys.stderr)


def check_alive(name: str, server: StartedServer) -> None:
    """ShunterError when a started server has exited (killed at the cap, most likely): the rest of
    the benchmark would only measure connection errors."""
    if server.process is None or server.process.poll() is None:
        return
    peak = _cgroup_peak(server.cgroup)
    at = f"; its cgroup peaked at {peak} bytes, the cap: raise --cap or --runtime-reserve" if peak else ""
    raise ShunterError(f"{name} exited with status {server.process.returncode} during its run{at}")


def measure_server_run(
    server: StartedServer, model: str, prompts: list[list[int]], concurrency: int, config: ServeBenchConfig
) -> LevelResult:
    before = _engine_counters(server.base_url)
    result = asyncio.run(run_level(server.base_url, model, prompts, concurrency, config))
    if result.unfinished:
        _wait_idle(server.base_url)
    after = _engine_counters(server.base_url)
    if "shunter_engine_steps_total" in after:
        result.engine_steps = after["shunter_engine_steps_total"] - before["shunter_engine_steps_total"]
        result.disk_read_bytes = after.get("shunter_disk_read_bytes_total", 0.0) - before.get(
            "shunter_disk_read_bytes_total", 0.0
        )
    return result


def measure_generate(
    prompt: list[int], config: ServeBenchConfig, log: TextIO
) -> tuple[LevelResult, int | None]:
    """`shunter generate` on one prompt in its own (capped) process: its tokens over its prefill +
    decode time (model loading excluded, as a server's is), and the cgroup's peak."""
    argv = [
        sys.executable, "-m", "shunter", "generate", config.model,
        "--prompt-ids", ",".join(map(str, prompt)), "--max-new-tokens", str(config.max_tokens), "--json",
    ]  # fmt: skip
    argv += ["--memory", config.memory] if config.memory else []
    with contextlib.ExitStack() as stack:
        import tempfile

        out = stack.enter_context(tempfile.TemporaryFile("w+"))
        with _capped_process(argv, config.cap_bytes, out, _python_env()) as (process, group):
            status = process.wait(timeout=config.request_timeout_s)
            peak = _cgroup_peak(group)
        out.seek(0)
        text = out.read()
    if status != 0:
        log.write(text[-3000:])
        raise ShunterError(f"shunter generate exited with status {status}; its last output is above")
    report = json.loads(text[text.index("{") :])
    tokens = report["generated_tokens"]
    wall_s = report["prefill_s"] + report["decode_s"]
    itl = report["decode_s"] / (tokens - 1) if tokens > 1 else None
    result = LevelResult(
        concurrency=1, requests=1, output_tokens=tokens, wall_s=wall_s, output_tok_s=tokens / wall_s,
        ttft_p50_s=report["prefill_s"], ttft_p95_s=report["prefill_s"], itl_p50_s=itl, itl_p95_s=itl,
    )  # fmt: skip
    return result, peak


# ---------------------------------------------------------------------------------------------
# the benchmark


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def summarize(runs: list[LevelResult], peaks: dict[str, int | None]) -> dict[str, Any]:
    """One contender at one level: medians over its timed runs, the spread of tok/s, every run."""
    rates = [r.output_tok_s for r in runs]
    figures = (
        "ttft_p50_s",
        "ttft_p95_s",
        "itl_p50_s",
        "itl_p95_s",
        "wall_s",
        "disk_read_bytes",
        "engine_steps",
    )
    return {
        "output_tok_s": statistics.median(rates),
        "output_tok_s_min": min(rates),
        "output_tok_s_max": max(rates),
        **{name: _median([getattr(r, name) for r in runs]) for name in figures},
        "requests": sum(r.requests for r in runs),
        "failed": sum(r.failed for r in runs),
        "unfinished": sum(r.unfinished for r in runs),
        "errors": [e for r in runs for e in r.errors][:3],
        **peaks,
        "runs": [asdict(r) for r in runs],
    }


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    return numerator / denominator if numerator and denominator else None


def level_ratios(contenders: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """Shunter's median tok/s over each other contender's at the same level."""
    shunter = contenders.get("shunter", {}).get("output_tok_s")
    return {
        f"shunter_over_{name.replace('-', '_')}": _ratio(shunter, row["output_tok_s"])
        for name, row in contenders.items()
        if name != "shunter"
    }


def check_cap_environment() -> None:
    """ShunterError unless this process can cap servers: root, with the cgroup v1 memory controller."""
    from shunter.bench.sandbox import MEMORY_CGROUP_ROOT, own_memory_cgroup

    if os.geteuid() != 0:
        raise ShunterError("--cap needs root (memory cgroups, dropping the page cache); run it with sudo")
    if own_memory_cgroup() is None:
        raise ShunterError(
            f"--cap needs the cgroup v1 memory controller ({MEMORY_CGROUP_ROOT}), which caps page cache "
            "and process memory together; this machine has none"
        )


def run_benchmark(config: ServeBenchConfig, progress: TextIO = sys.stderr) -> dict[str, Any]:
    """Every contender at every level, interleaved round by round; the report's JSON form."""
    if config.cap_bytes is not None:
        check_cap_environment()
    servers = [c for c in config.contenders if c in SERVER_CONTENDERS]
    prompts_used = 0
    levels = []
    for concurrency in config.concurrency:
        per_round = concurrency * config.requests_per_client
        runs: dict[str, list[LevelResult]] = {
            c: [] for c in config.contenders if c != "generate" or concurrency == 1
        }
        peaks: dict[str, dict[str, int | None]] = {}
        generate_peak: int | None = None
        with contextlib.ExitStack() as stack:
            started = {}
            for name in servers:
                print(
                    f"bench serve: starting {name} for {concurrency} clients ...", file=progress, flush=True
                )
                started[name] = stack.enter_context(started_server(name, concurrency, config, progress))
            models = {name: _served_model(server.base_url) for name, server in started.items()}
            for round_number in range(config.warmup + config.reps):
                which = (
                    "warm-up" if round_number < config.warmup else f"rep {round_number - config.warmup + 1}"
                )
                prompts = held_out_prompt_ids(per_round, config.prompt_tokens, first=prompts_used)
                prompts_used += per_round
                for name in runs:
                    if name == "generate":
                        result, peak = measure_generate(prompts[0], config, progress)
                        generate_peak = max(generate_peak or 0, peak or 0) or None
                    else:
                        result = measure_server_run(started[name], models[name], prompts, concurrency, config)
                        check_alive(name, started[name])
                    stopped = f", {result.unfinished} stopped" if result.unfinished else ""
                    failed = f", {result.failed} failed: {result.errors[0]}" if result.failed else ""
                    print(
                        f"  {concurrency:>3} clients {name:<14} {which:>7}: "
                        f"{result.output_tok_s:8.2f} tok/s, {result.wall_s:6.1f} s{stopped}{failed}",
                        file=progress,
                        flush=True,
                    )
                    if round_number >= config.warmup:
                        runs[name].append(result)
            stack.close()  # stop the servers: their peaks are read on the way
            for name, server in started.items():
                peaks[name] = {
                    "peak_rss_bytes": server.peak_rss_bytes,
                    "peak_cgroup_bytes": server.peak_cgroup_bytes,
                }
        peaks["generate"] = {"peak_rss_bytes": None, "peak_cgroup_bytes": generate_peak}
        contenders = {name: summarize(results, peaks[name]) for name, results in runs.items()}
        levels.append(
            {"concurrency": concurrency, "contenders": contenders, "ratios": level_ratios(contenders)}
        )
    return {
        "model": config.model,
        "gguf": config.gguf,
        "cap_bytes": config.cap_bytes,
        "memory": config.memory,
        "max_tokens": config.max_tokens,
        "prompt_tokens": config.prompt_tokens,
        "requests_per_client": config.requests_per_client,
        "reps": config.reps,
        "warmup": config.warmup,
        "max_run_s": config.max_run_s,
        "threads": config.threads,
        "contenders": list(config.contenders),
        "levels": levels,
    }


def print_serve_table(report: dict) -> None:
    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value * 1e3:.0f}"

    def ratio(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}x"

    cap = f", cap {report['cap_bytes']} bytes" if report["cap_bytes"] else ""
    memory = f", shunter --memory {report['memory']}" if report["memory"] else ""
    print(
        f"{report['model']}{cap}{memory}: {report['max_tokens']} tokens per completion, "
        f"{report['prompt_tokens']}-token prompts, {report['requests_per_client']} requests per client; "
        f"median of {report['reps']} after {report['warmup']} warm-up"
    )
    header = (
        f"{'clients':>7} {'contender':<14} {'out tok/s':>9} {'min-max':>13} {'TTFT p50':>9} {'p95 ms':>7} "
        f"{'ITL p50':>8} {'p95 ms':>7} {'shunter/x':>9} {'peak MB':>8}"
    )
    print("  " + header)
    for level in report["levels"]:
        for name, row in level["contenders"].items():
            over = level["ratios"].get("shunter_over_" + name.replace("-", "_"))
            spread = f"{row['output_tok_s_min']:.1f}-{row['output_tok_s_max']:.1f}"
            peak = row.get("peak_cgroup_bytes") or row.get("peak_rss_bytes")
            notes = []
            if row["unfinished"]:
                notes.append(f"{row['unfinished']} stopped at {report['max_run_s']:g} s")
            if row["failed"]:
                notes.append(f"{row['failed']} failed: {row['errors'][0]}")
            print(
                f"  {level['concurrency']:>7} {name:<14} {row['output_tok_s']:>9.2f} {spread:>13} "
                f"{ms(row['ttft_p50_s']):>9} {ms(row['ttft_p95_s']):>7} {ms(row['itl_p50_s']):>8} "
                f"{ms(row['itl_p95_s']):>7} {ratio(over):>9} "
                f"{'-' if peak is None else f'{peak / 1e6:.0f}':>8}"
                + (f"  ({'; '.join(notes)})" if notes else "")
            )


def plot_throughput(report: dict, path: Path) -> None:
    """Output tok/s against concurrent clients, one line per contender (median, min-max bars)."""
    from shunter.sim.plots import pyplot, save_figure

    plt = pyplot()
    figure, axis = plt.subplots(figsize=(6, 4))
    for name in report["contenders"]:
        points = [
            (lv["concurrency"], lv["contenders"][name]) for lv in report["levels"] if name in lv["contenders"]
        ]
        if not points:
            continue
        x = [c for c, _ in points]
        y = [row["output_tok_s"] for _, row in points]
        low = [row["output_tok_s"] - row["output_tok_s_min"] for _, row in points]
        high = [row["output_tok_s_max"] - row["output_tok_s"] for _, row in points]
        axis.errorbar(x, y, yerr=[low, high], marker="o", capsize=3, label=name)
    axis.set_xscale("log", base=2)
    axis.set_yscale("log")
    ticks = [lv["concurrency"] for lv in report["levels"]]
    axis.set_xticks(ticks, [str(t) for t in ticks])
    axis.set_xlabel("concurrent streaming clients")
    axis.set_ylabel("output tokens/s (median, min-max)")
    cap = f", cap {report['cap_bytes'] / 1e9:.2f} GB" if report["cap_bytes"] else ""
    axis.set_title(f"{Path(report['model']).name}: {report['max_tokens']} tokens per completion{cap}")
    axis.grid(True, alpha=0.3)
    axis.legend()
    save_figure(figure, path)
    plt.close(figure)
