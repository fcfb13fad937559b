"""In-memory executor vs transformers on the same Mixtral-like checkpoint, side by side.

Both run their real generation path on the same prompts: shunter's `generate` and transformers'
`model.generate` (timed with a streamer: prefill = prompt in -> first token out, decode = the
remaining tokens). Median of --reps runs after one warm-up; min and max printed too.

    .venv/bin/python bench/inmemory.py [--reps 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from shunter.model import SamplingParams, generate, load_model

CACHE = Path(__file__).resolve().parent.parent / ".bench_cache"
# ~791M parameters: hidden 1024, expert intermediate 3584, 8 experts top-2, 8 layers, vocab 32000.
MIXTRAL_LIKE = dict(
    vocab_size=32000,
    hidden_size=1024,
    intermediate_size=3584,
    num_hidden_layers=8,
    num_attention_heads=16,
    num_key_value_heads=4,
    num_local_experts=8,
    num_experts_per_tok=2,
    max_position_embeddings=4096,
    tie_word_embeddings=False,
)


def build_checkpoint(path: Path) -> Path:
    if (path / "config.json").is_file():
        return path
    from transformers import AutoConfig, AutoModelForCausalLM

    print(f"building {path} (random weights, bf16) ...", file=sys.stderr)
    torch.manual_seed(0)
    config = AutoConfig.for_model("mixtral", **MIXTRAL_LIKE)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    with torch.no_grad():  # sharpen routers so a few experts are hot, as in trained models
        for name, param in model.named_parameters():
            if name.endswith("gate.weight"):
                param.mul_(20.0)
    model.save_pretrained(path)
    return path


class StepClock:
    """A transformers streamer that timestamps every `put`: the prompt, then each new token."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, _value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def run_transformers(model, prompts: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    clock = StepClock()
    with torch.inference_mode():
        model.generate(
            input_ids=prompts,
            attention_mask=torch.ones_like(prompts),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            streamer=clock,
            pad_token_id=0,
        )
    t = clock.times  # t[0] prompt in, t[1] first token, t[-1] last token
    return t[1] - t[0], t[-1] - t[1]


def run_shunter(model, prompts: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    result = generate(model, prompts.tolist(), new_tokens, SamplingParams())
    return result.prefill_s, result.decode_s


def summarise(samples: list[float]) -> dict[str, float]:
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples)}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM

    path = build_checkpoint(CACHE / "mixtral-like-791m-bf16")
    ours = load_model(path).model
    theirs = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    params = sum(p.numel() for p in theirs.parameters())
    print(f"model: Mixtral-like {params / 1e6:.0f}M params, bf16, threads={torch.get_num_threads()}")

    rows = []
    for batch in [int(b) for b in args.batches.split(",")]:
        prompts = torch.randint(
            3,
            MIXTRAL_LIKE["vocab_size"],
            (batch, args.prompt_len),
            generator=torch.Generator().manual_seed(batch),
        )
        timings: dict[str, dict[str, list[float]]] = {
            "shunter": {"prefill": [], "decode": []},
            "transformers": {"prefill": [], "decode": []},
        }
        for rep in range(args.reps + 1):  # rep 0 is the warm-up
            for name, runner, model in (
                ("shunter", run_shunter, ours),
                ("transformers", run_transformers, theirs),
            ):
                prefill_s, decode_s = runner(model, prompts, args.new_tokens)
                if rep > 0:
                    timings[name]["prefill"].append(batch * args.prompt_len / prefill_s)
                    timings[name]["decode"].append(batch * (args.new_tokens - 1) / decode_s)
        for phase in ("prefill", "decode"):
            s, t = summarise(timings["shunter"][phase]), summarise(timings["transformers"][phase])
            rows.append(
                {
                    "batch": batch,
                    "phase": phase,
                    "shunter_tok_s": s,
                    "transformers_tok_s": t,
                    "ratio": s["median"] / t["median"],
                }
            )
            print(
                f"batch {batch:2d} {phase:7s}  "
                f"shunter {s['median']:8.1f} tok/s [{s['min']:.1f}-{s['max']:.1f}]"
                f"  transformers {t['median']:8.1f} tok/s [{t['min']:.1f}-{t['max']:.1f}]"
                f"  ratio {s['median'] / t['median']:.2f}x",
                flush=True,
            )
    if args.json:
        args.json.write_text(json.dumps({"params": params, "reps": args.reps, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
