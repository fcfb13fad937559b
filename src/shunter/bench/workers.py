"""The contenders of `shunter bench offload`, one job per process.

`python -m shunter.bench.workers JOB.json RESULT.json` runs one job (a JSON dict whose "kind" names
the worker) and writes its JSON result; bench.sandbox starts it inside a memory cgroup. Every
contender decodes the same prompts: every sequence its own PROMPT_TOKENS random ids (seeded, so
every contender and every run gets the same ones), greedy, no stop token.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shunter.errors import ShunterError
from shunter.model.checkpoint import Checkpoint, TensorLocation
from shunter.model.loader import model_trace
from shunter.model.spec import ModelSpec, load_spec
from shunter.model.weights import CheckpointLayout
from shunter.offload.engine import OffloadedModel
from shunter.offload.placement import OffloadPlacement
from shunter.offload.planner import expected_touched_experts

PROMPT_TOKENS = 16
PROMPT_SEED = 0


def prompts(sequences: int, vocab_size: int) -> list[list[int]]:
    """[sequences][PROMPT_TOKENS] independent random token ids, the same length (no padding).
    Shifted copies of one sequence would route alike and flatter every expert cache."""
    generator = np.random.default_rng(PROMPT_SEED)
    return generator.integers(0, vocab_size, size=(sequences, PROMPT_TOKENS)).tolist()


# ---------------------------------------------------------------------------------------------
# what the placement says the engine reads


class _ByteCounter:
    """A CheckpointLayout fetch that reads nothing: it adds up each tensor's bytes on disk (as
    DirectReader.stats.bytes_read counts them) and hands back an empty meta tensor of its shape."""

    def __init__(self) -> None:
        self.bytes = 0

    def __call__(self, loc: TensorLocation) -> torch.Tensor:
        self.bytes += loc.num_bytes
        return torch.empty(loc.shape, dtype=loc.dtype, device="meta")


def planned_read_bytes(
    spec: ModelSpec,
    checkpoint: Checkpoint,
    placement: OffloadPlacement,
    dtype: torch.dtype,
    touched_experts: float | None = None,
) -> tuple[int, int]:
    """(bytes read once at load: embeddings, head and what the placement pins; bytes streamed per
    forward), in checkpoint bytes.

    A forward streams every layer block the placement leaves on disk and, per MoE layer, either
    every expert it leaves on disk (touched_experts None: whole-layer prefetch, exact) or the
    expected `touched_experts` of them, at the layer's mean streamed expert size (hot-only
    prefetch; a mispredicted prefetch adds to what is read)."""
    counter = _ByteCounter()
    layout = CheckpointLayout(spec, checkpoint, fetch=counter)
    embed = layout.embed(dtype)
    layout.final_norm(dtype)
    layout.lm_head(dtype, embed)
    for layer in sorted(placement.resident_blocks):
        layout.layer(layer, dtype, False)
    for layer, expert in sorted(placement.resident_experts):
        layout.expert(layer, expert, dtype)
    at_load, counter.bytes = counter.bytes, 0
    for layer in range(spec.num_layers):
        if layer not in placement.resident_blocks:
            layout.layer(layer, dtype, False)
        if not spec.moe_layers[layer]:
            continue
        before = counter.bytes
        streamed = [e for e in range(spec.num_experts) if (layer, e) not in placement.resident_experts]
        for expert in streamed:
            layout.expert(layer, expert, dtype)
        if touched_experts is not None and streamed:
            layer_bytes = counter.bytes - before
            # touched experts are spread over resident and streamed ones alike
            counter.bytes = before + round(
                layer_bytes / spec.num_experts * min(touched_experts, spec.num_experts)
            )
    return at_load, counter.bytes


def process_read_bytes() -> int:
    """Bytes this process has fetched from storage (/proc/self/io read_bytes): O_DIRECT reads,
    page faults of memory-mapped files and readahead alike."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    return 0


# ---------------------------------------------------------------------------------------------
# the workers: each runs in its own process and returns a JSON-able dict


def shunter_worker(job: dict[str, Any]) -> dict[str, Any]:
    """The offload engine on job["sequences"] prompts in one forward."""
    from shunter.model.generate import generate
    from shunter.offload import PipelineOptions, load_offloaded

    path = Path(job["model"])
    spec = load_spec(path)
    sequence_prompts = prompts(job["sequences"], spec.vocab_size)
    options = PipelineOptions(job["num_batches"], job["prefetch"], job["hot_first"])
    read_before = process_read_bytes()
    model: OffloadedModel = load_offloaded(
        path,
        job["memory_bytes"],
        options=options,
        sequences=len(sequence_prompts),
        max_slots=PROMPT_TOKENS + job["new_tokens"],
        trace=model_trace(path),
        device=job.get("device", "cpu"),
        host_memory_bytes=job.get("host_memory_bytes", 0),
    )
    stats = model.reader.stats
    at_first_step: list[tuple[int, float]] = []  # (bytes read, read seconds) when decoding starts

    def mark_decode_start(_tokens: list[int | None]) -> None:
        if not at_first_step:
            at_first_step.append((stats.bytes_read, stats.seconds))

    try:
        result = generate(model, sequence_prompts, job["new_tokens"], on_step=mark_decode_start)
        decode_bytes = stats.bytes_read - at_first_step[0][0]
        decode_read_s = stats.seconds - at_first_step[0][1]
        checkpoint = Checkpoint(path)
        share = np.full(spec.num_experts, 1.0 / spec.num_experts)

        def streamed_per_forward(tokens: int) -> int:
            touched = (
                None if options.prefetch == "layer" else expected_touched_experts(share, spec.top_k, tokens)
            )
            return planned_read_bytes(spec, checkpoint, model.placement, model.dtype, touched)[1]

        at_load, _ = planned_read_bytes(spec, checkpoint, model.placement, model.dtype)
        # the prefill (every prompt token), then one forward per decode step (a token per sequence)
        planned = streamed_per_forward(len(sequence_prompts) * PROMPT_TOKENS)
        planned += result.decode_steps * streamed_per_forward(len(sequence_prompts))
        return {
            "decode_tok_s": result.decode_tok_s,
            "bytes_read": stats.bytes_read,
            "planned_bytes_read": at_load + planned,
            "disk_read_bytes": process_read_bytes() - read_before,
            # the rate this run's decode reads got from the disk: bytes over the seconds spent in
            # them (not the idle time between them), the disk as it was during this run
            "decode_disk_bytes_s": decode_bytes / decode_read_s if decode_read_s > 0 else None,
            # how much of the decode the I/O thread spent reading: near 1, reads bind and it never waits
            "decode_io_busy": decode_read_s / result.decode_s if result.decode_s > 0 else None,
            "prefetch_hit_rate": model.prefetcher.hit_rate if options.prefetch == "hot" else None,
            "generated_ids": result.tokens,
        }
    finally:
        model.close()


def in_memory_worker(job: dict[str, Any]) -> dict[str, Any]:
    """The in-memory executor on job["sequences"] prompts in one batch."""
    from shunter.model.generate import generate
    from shunter.model.loader import load_model

    read_before = process_read_bytes()
    loaded = load_model(job["model"], device=job.get("device", "cpu"))
    result = generate(loaded.model, prompts(job["sequences"], loaded.spec.vocab_size), job["new_tokens"])
    return {
        "decode_tok_s": result.decode_tok_s,
        "disk_read_bytes": process_read_bytes() - read_before,
        "generated_ids": result.tokens,
    }


def accelerate_worker(job: dict[str, Any]) -> dict[str, Any]:
    """transformers + accelerate: device_map="auto" keeps up to cpu_bytes of weights in RAM and
    memory-maps the rest from offload_folder; batch job["sequences"]. Decode tok/s is timed with a
    streamer: from the first generated token to the last."""
    from transformers import AutoModelForCausalLM

    read_before = process_read_bytes()
    model = AutoModelForCausalLM.from_pretrained(
        job["model"],
        dtype="auto",
        device_map="auto",
        max_memory={"cpu": job["cpu_bytes"]},
        offload_folder=job["offload_folder"],
    )
    ids = torch.tensor(prompts(job["sequences"], model.config.vocab_size))
    times: list[float] = []

    class Clock:  # transformers calls put() with the prompt, then once per generated token
        def put(self, _value: torch.Tensor) -> None:
            times.append(time.perf_counter())

        def end(self) -> None:
            pass

    new = job["new_tokens"]
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            streamer=Clock(),
            pad_token_id=0,
        )
    return {
        "decode_tok_s": job["sequences"] * (new - 1) / (times[-1] - times[1]),
        "disk_read_bytes": process_read_bytes() - read_before,
        "generated_ids": out[:, PROMPT_TOKENS:].tolist(),
    }


WORKERS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "shunter": shunter_worker,
    "in-memory": in_memory_worker,
    "accelerate": accelerate_worker,
}


def worker_main(argv: list[str]) -> int:
    """`python -m shunter.bench.workers JOB.json RESULT.json`: run one job, write its result."""
    job_path, result_path = argv
    job = json.loads(Path(job_path).read_text())
    try:
        result = WORKERS[job["kind"]](job)
    except ShunterError as exc:
        print(f"shunter: error: {exc}", file=sys.stderr)
        return 2
    Path(result_path).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
