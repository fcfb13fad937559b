"""`shunter bench serve`: streaming OpenAI clients against a server, concurrency level by level.

At each level C, C clients each send `requests_per_client` streamed completions one after another
(independent prompts cut from the built-in model's held-out text, a fixed output length with
`ignore_eos`), and the level reports output tokens per second over its wall time, time to first
token and inter-token latency (p50, p95). The server is `shunter serve` started in its own process
(so the clients do not share its interpreter), or any OpenAI server given by URL (llama.cpp's
llama-server, vLLM).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
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


@dataclass(frozen=True)
class ServeBenchConfig:
    concurrency: tuple[int, ...] = (1, 4, 16, 64)
    max_tokens: int = 32  # every completion's length (ignore_eos)
    prompt_tokens: int = 32  # held-out tokens per prompt (re-tokenised by the server)
    requests_per_client: int = 2
    request_timeout_s: float = 600.0
    # the server: a URL (a peer), else `shunter serve` started with these
    peer_url: str | None = None
    model: str = "shunter-tiny"
    serve_flags: tuple[str, ...] = ()
    max_sequences: int | None = None  # default: the largest concurrency level


@dataclass
class RequestTiming:
    ttft_s: float
    gaps_s: list[float]
    output_tokens: int


@dataclass
class LevelResult:
    concurrency: int
    requests: int
    output_tokens: int
    wall_s: float
    output_tok_s: float
    ttft_p50_s: float
    ttft_p95_s: float
    itl_p50_s: float | None
    itl_p95_s: float | None
    failed: int = 0
    errors: list[str] = field(default_factory=list)


def held_out_prompts(count: int, prompt_tokens: int) -> list[str]:
    """`count` independent prompts: consecutive, non-overlapping windows of the built-in model's
    held-out tokens (its routing trace), decoded to text so that any server can take them."""
    from shunter.model.loader import BUILTIN_ROOT, DEFAULT_MODEL, TRACE_FILE
    from shunter.model.tokenizer import Tokenizer
    from shunter.trace import load_trace

    model_dir = BUILTIN_ROOT / DEFAULT_MODEL
    tokens = load_trace(model_dir / TRACE_FILE).token_ids
    tokenizer = Tokenizer.from_model_dir(model_dir)
    if tokens is None or tokenizer is None:
        raise ShunterError(f"{model_dir}: the built-in model's held-out tokens or tokenizer are missing")
    windows = len(tokens) // prompt_tokens
    if windows < 1:
        raise ShunterError(f"--prompt-tokens {prompt_tokens}: longer than the held-out text ({len(tokens)})")
    stride = max(1, windows // count)
    return [
        tokenizer.decode(tokens[w * prompt_tokens : (w + 1) * prompt_tokens].tolist())
        for w in ((i * stride) % windows for i in range(count))
    ]


def percentile(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if len(values) else None


async def _one_request(client: Any, model: str, prompt: str, max_tokens: int) -> RequestTiming:
    started = time.perf_counter()
    stream = await client.completions.create(
        model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    )  # fmt: skip
    arrivals, usage = [], None
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage.completion_tokens
        if chunk.choices and chunk.choices[0].text:
            arrivals.append(time.perf_counter())
    if not arrivals:
        raise ShunterError("the server streamed no text")
    gaps = np.diff(arrivals).tolist()
    return RequestTiming(arrivals[0] - started, gaps, usage if usage is not None else len(arrivals))


async def run_level(
    base_url: str, model: str, prompts: list[str], concurrency: int, config: ServeBenchConfig
) -> LevelResult:
    """C clients, each sending its requests one after another; all prompts distinct."""
    import openai

    client = openai.AsyncOpenAI(
        base_url=base_url, api_key="unused", max_retries=0, timeout=config.request_timeout_s
    )
    timings: list[RequestTiming] = []
    errors: list[str] = []

    async def one_client(index: int) -> None:
        for k in range(config.requests_per_client):
            prompt = prompts[(index * config.requests_per_client + k) % len(prompts)]
            try:
                timings.append(await _one_request(client, model, prompt, config.max_tokens))
            except (openai.OpenAIError, ShunterError) as exc:
                errors.append(f"{type(exc).__name__}: {exc}")

    started = time.perf_counter()
    async with client:
        await asyncio.gather(*(one_client(i) for i in range(concurrency)))
    wall_s = time.perf_counter() - started
    ttft = [t.ttft_s for t in timings]
    gaps = [g for t in timings for g in t.gaps_s]
    output_tokens = sum(t.output_tokens for t in timings)
    return LevelResult(
        concurrency=concurrency,
        requests=len(timings),
        output_tokens=output_tokens,
        wall_s=wall_s,
        output_tok_s=output_tokens / wall_s if wall_s > 0 else 0.0,
        ttft_p50_s=percentile(ttft, 50) or 0.0,
        ttft_p95_s=percentile(ttft, 95) or 0.0,
        itl_p50_s=percentile(gaps, 50),
        itl_p95_s=percentile(gaps, 95),
        failed=len(errors),
        errors=errors[:3],
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def shunter_server(config: ServeBenchConfig, log: TextIO) -> Iterator[str]:
    """`shunter serve` in its own process on a free port; yields its /v1 URL once /health answers."""
    import httpx

    port = _free_port()
    max_sequences = config.max_sequences or max(config.concurrency)
    argv = [
        sys.executable, "-m", "shunter", "serve", config.model, "--port", str(port),
        "--max-sequences", str(max_sequences), "--max-queue", str(max(config.concurrency) * 2),
        *config.serve_flags,
    ]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p and Path(p).is_dir()))
    process = subprocess.Popen(argv, stdout=log, stderr=log, env=env)
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                raise ShunterError(
                    f"`{' '.join(argv[2:])}` exited with status {process.returncode} before serving"
                )
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise ShunterError(f"shunter serve did not answer /health within {SERVER_START_TIMEOUT_S} s")
            time.sleep(0.2)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _served_model(base_url: str) -> str:
    """The first model the server lists (llama-server and vLLM want a name they know)."""
    import httpx

    try:
        data = httpx.get(base_url.rstrip("/") + "/models", timeout=10).json()["data"]
        return str(data[0]["id"])
    except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError):
        return "default"


def run_benchmark(config: ServeBenchConfig, progress: TextIO = sys.stderr) -> dict[str, Any]:
    """Every concurrency level against one server; the report's JSON form."""
    prompts = held_out_prompts(max(config.concurrency) * config.requests_per_client, config.prompt_tokens)
    with contextlib.ExitStack() as stack:
        if config.peer_url:
            base_url, server = config.peer_url.rstrip("/"), config.peer_url
        else:
            base_url, server = stack.enter_context(shunter_server(config, progress)), "shunter serve"
        model = _served_model(base_url)
        levels = []
        for concurrency in config.concurrency:
            print(f"bench serve: {concurrency} concurrent clients ...", file=progress, flush=True)
            levels.append(asyncio.run(run_level(base_url, model, prompts, concurrency, config)))
    return {
        "server": server,
        "model": model,
        "max_sequences": None if config.peer_url else config.max_sequences or max(config.concurrency),
        "max_tokens": config.max_tokens,
        "prompt_tokens": config.prompt_tokens,
        "requests_per_client": config.requests_per_client,
        "levels": [asdict(level) for level in levels],
    }


def print_serve_table(report: dict) -> None:
    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value * 1e3:.1f}"

    server = report["server"]
    if report["max_sequences"]:
        server += f" --max-sequences {report['max_sequences']}"
    print(
        f"{server} ({report['model']}), {report['max_tokens']} tokens per completion, "
        f"~{report['prompt_tokens']}-token prompts, {report['requests_per_client']} requests per client"
    )
    header = f"{'clients':>7} {'requests':>8} {'out tok/s':>10} {'TTFT p50':>9} {'p95 ms':>7}"
    print(f"  {header} {'ITL p50':>8} {'p95 ms':>7}")
    for row in report["levels"]:
        failed = f"  ({row['failed']} failed: {row['errors'][0]})" if row["failed"] else ""
        print(
            f"  {row['concurrency']:>7} {row['requests']:>8} {row['output_tok_s']:>10.1f} "
            f"{ms(row['ttft_p50_s']):>9} {ms(row['ttft_p95_s']):>7} {ms(row['itl_p50_s']):>8} "
            f"{ms(row['itl_p95_s']):>7}{failed}"
        )


def plot_throughput(reports: list[dict], path: Path) -> None:
    """Output tok/s against concurrent clients, one line per report (server)."""
    from shunter.sim.plots import pyplot, save_figure

    plt = pyplot()
    figure, axis = plt.subplots(figsize=(6, 4))
    for report in reports:
        levels = report["levels"]
        label = report["server"] + (
            f" (--max-sequences {report['max_sequences']})" if report["max_sequences"] else ""
        )
        axis.plot(
            [r["concurrency"] for r in levels], [r["output_tok_s"] for r in levels], marker="o", label=label
        )
    axis.set_xscale("log", base=2)
    ticks = sorted({r["concurrency"] for report in reports for r in report["levels"]})
    axis.set_xticks(ticks, [str(t) for t in ticks])
    axis.set_xlabel("concurrent streaming clients")
    axis.set_ylabel("output tokens/s")
    axis.set_title(f"{reports[0]['model']}: {reports[0]['max_tokens']} tokens per completion")
    axis.grid(True, alpha=0.3)
    axis.legend()
    save_figure(figure, path)
    plt.close(figure)
