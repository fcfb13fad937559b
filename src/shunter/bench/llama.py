"""llama.cpp as a contender of `shunter bench offload`: one `llama-batched-bench` run per job.

`python -m shunter.bench.llama JOB.json RESULT.json` runs llama.cpp's batched benchmark on a GGUF
file for S sequences (each its own random 16-token prompt, then `new_tokens` decode steps shared by
all S) and writes the worker result shape bench.rounds reads. It imports no torch: inside a memory
cgroup, whatever this process holds is taken from llama.cpp's page cache, so it stays a few MB.
llama.cpp memory-maps the file; under a cap the cgroup bounds how much of it stays cached.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

from shunter.errors import ShunterError

BATCH_TOKENS = 2048  # llama.cpp's -b: the whole prefill of 64 sequences of 16 tokens in one batch
UBATCH_TOKENS = 512  # its -ub (its default)


def batched_bench_argv(
    binary: str, gguf: str, sequences: int, prompt_tokens: int, new_tokens: int, threads: int
) -> list[str]:
    """llama-batched-bench for one point: S sequences, each prompt_tokens random ids, new_tokens steps."""
    context = sequences * (prompt_tokens + new_tokens) + 16
    return [
        binary, "-m", gguf, "-c", str(context), "-b", str(BATCH_TOKENS), "-ub", str(UBATCH_TOKENS),
        "-npp", str(prompt_tokens), "-ntg", str(new_tokens), "-npl", str(sequences),
        "-t", str(threads), "-tb", str(threads), "--output-format", "jsonl",
    ]  # fmt: skip


def parse_batched_bench(output: str, sequences: int) -> dict[str, float]:
    """The JSON line of the S-sequence point: decode tok/s summed over sequences (`speed_tg`), and
    the prompt's. ShunterError naming what is missing when llama.cpp printed no such line."""
    for line in output.splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            point = json.loads(line)
        except json.JSONDecodeError:
            continue
        if point.get("pl") == sequences and "speed_tg" in point:
            return {
                "decode_tok_s": float(point["speed_tg"]),
                "decode_s": float(point["t_tg"]),
                "prefill_tok_s": float(point["speed_pp"]),
            }
    raise ShunterError(f"llama-batched-bench printed no result line for {sequences} sequences")


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    argv = batched_bench_argv(
        job["binary"], job["gguf"], job["sequences"], job["prompt_tokens"], job["new_tokens"], job["threads"]
    )
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        sys.stderr.write(done.stderr[-3000:])
        raise ShunterError(f"{argv[0]} exited with status {done.returncode}")
    try:
        result: dict[str, Any] = parse_batched_bench(done.stdout + done.stderr, job["sequences"])
    except ShunterError:
        sys.stderr.write((done.stdout + done.stderr)[-3000:])
        raise
    # the blocks llama.cpp read from disk (512-byte units): its page faults on the mapped file
    result["disk_read_bytes"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_inblock * 512
    result["generated_ids"] = None  # it feeds random tokens, it does not sample
    return result


def main(argv: list[str] | None = None) -> int:
    job_path, result_path = (argv if argv is not None else sys.argv[1:])[:2]
    result = run_job(json.loads(Path(job_path).read_text()))
    Path(result_path).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
