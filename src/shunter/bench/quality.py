"""Quantised quality beside llama.cpp's: the same model, held-out text, windows and bits.

`python -m shunter.bench.quality --llama-bin DIR --workdir DIR --shunter 8-bit=Q8DIR ...
--llama-base bf16.gguf --llama Q8_0=q8_0.gguf ...` writes the built-in model's held-out text (the
first `--tokens` tokens `shunter quantize --eval-tokens` evaluates) to a file, runs llama.cpp's
`llama-perplexity` on it, and scores Shunter's models on the same tokens under the same two
window schemes llama-perplexity has:

- `strided` (`--ppl-stride`): windows of `window` tokens every `window - 1` tokens; every token
  but the first is predicted once (Shunter's own scheme, `compare_quality` at window - 1);
- `halves` (its default, and the only one its `--kl-divergence` has): disjoint windows of `window`
  tokens, each scoring only its second half (targets window/2 + 1 .. window - 1).

Bits per byte are the scored targets' nats over the scored targets' UTF-8 bytes, on both sides.
KL is KL(base || quantised) per scored position, from llama.cpp's stored base log-probabilities
on its side and from the bf16 model on Shunter's. llama.cpp runs without a BOS token (the
built-in model has none). Nothing here runs in `make test`: it needs a llama.cpp build.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from shunter.errors import ShunterError
from shunter.files import atomic_output

NO_BOS = ["--override-kv", "tokenizer.ggml.add_bos_token=bool:false"]


@dataclass(frozen=True)
class Scheme:
    """How a token stream is cut: windows of `window` tokens starting every `stride` tokens; in each,
    positions score_from .. window - 2 predict targets score_from + 1 .. window - 1."""

    name: str
    window: int
    stride: int
    score_from: int

    def starts(self, n_tokens: int) -> list[int]:
        """Window starts as llama-perplexity counts them (perplexity_v2 / perplexity)."""
        if self.stride == self.window:
            count = n_tokens // self.window
        else:
            count = (n_tokens - self.window + self.stride - 1) // self.stride
        if count < 1:
            raise ShunterError(f"{n_tokens} tokens are too few for {self.name} windows of {self.window}")
        return [i * self.stride for i in range(count)]

    def targets(self, n_tokens: int) -> np.ndarray:
        """Stream indices of the scored targets [n_scored], in scoring order."""
        return np.concatenate(
            [np.arange(s + self.score_from + 1, s + self.window) for s in self.starts(n_tokens)]
        )


def strided(window: int) -> Scheme:
    return Scheme("strided", window, window - 1, 0)


def halves(window: int) -> Scheme:
    return Scheme("halves", window, window, window // 2)


def byte_level_token_bytes(tokenizer_json: Path) -> np.ndarray:
    """UTF-8 bytes each token id of a byte-level BPE tokenizer stands for [vocab] (special tokens: 0).
    Counted from the token's own bytes, so a token holding part of a character counts its part."""
    spec = json.loads(Path(tokenizer_json).read_text(encoding="utf-8"))
    byte_of_char = {ch: b for b, ch in _bytes_to_unicode().items()}
    ids = [*spec["model"]["vocab"].values(), *(added["id"] for added in spec.get("added_tokens", []))]
    lengths = np.zeros(max(ids) + 1, dtype=np.int64)
    for token, token_id in spec["model"]["vocab"].items():
        if any(ch not in byte_of_char for ch in token):
            raise ShunterError(f"{tokenizer_json}: model.vocab token {token!r} is not byte-level BPE")
        lengths[token_id] = len(token)
    for added in spec.get("added_tokens", []):
        lengths[added["id"]] = 0 if added.get("special") else len(added["content"].encode("utf-8"))
    return lengths


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, which byte-level BPE vocabularies are written in."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    )
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


# ---- llama.cpp side ----


def perplexity_argv(binary: str, gguf: str, text_file: str, scheme: Scheme, threads: int) -> list[str]:
    """llama-perplexity over `scheme`. Strided: it widens -c by stride/2 (and pads contexts to 256),
    so -c window - stride/2 gives windows of `window`; -b = -c keeps one sequence per pass."""
    if scheme.name == "strided":
        context = scheme.window - scheme.stride // 2
        extra = ["--ppl-stride", str(scheme.stride)]
    else:
        context, extra = scheme.window, []
    return [
        binary, "-m", gguf, "-f", text_file, "-c", str(context), "-b", str(context),
        "-t", str(threads), *NO_BOS, *extra,
    ]  # fmt: skip


def parse_perplexity(output: str) -> float:
    """The perplexity over all scored tokens: 'Final estimate: PPL = X' (halves) or, for strided
    runs, which print no final line, the last running '[k]X,' figure."""
    final = re.search(r"Final estimate: PPL = ([0-9.]+)", output)
    if final:
        return float(final.group(1))
    running = re.findall(r"\[(\d+)\]([0-9.]+),", output)
    if not running:
        raise ShunterError("llama-perplexity printed no perplexity figure")
    return float(running[-1][1])


KL_FIELDS = {
    "ppl": r"Mean PPL\(Q\)\s*:\s*([0-9.]+)",
    "kl_mean": r"Mean\s+KLD:\s*(-?[0-9.]+)",
    "kl_max": r"Maximum KLD:\s*(-?[0-9.]+)",
    "kl_p99": r"99\.0%\s+KLD:\s*(-?[0-9.]+)",
    "same_top_percent": r"Same top p:\s*([0-9.]+)",
}


def parse_kl_divergence(output: str) -> dict[str, float]:
    """The summary of `llama-perplexity --kl-divergence`: PPL of the quantised model, mean, max and
    99th-percentile KL (nats per token), and the percentage of positions with the base's top token."""
    found = {}
    for key, pattern in KL_FIELDS.items():
        match = re.search(pattern, output)
        if match is None:
            raise ShunterError(f"llama-perplexity --kl-divergence printed no {key} line ({pattern})")
        found[key] = float(match.group(1))
    return found


def run_llama(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True)
    except OSError as exc:
        raise ShunterError(f"{argv[0]}: cannot run it ({exc.strerror})") from None
    # its log lines go to stderr from a logging thread, the chunk figures to stdout: kept apart
    output = done.stdout + "\n" + done.stderr
    if done.returncode != 0:
        raise ShunterError(f"{argv[0]} exited with status {done.returncode}: {output[-2000:]}")
    return output


def bits_per_byte(ppl: float, scored_tokens: int, scored_bytes: int) -> float:
    return scored_tokens * math.log(ppl) / math.log(2) / scored_bytes


# ---- Shunter side ----


@dataclass(frozen=True)
class Scores:
    bits_per_byte: float
    kl_mean: float  # KL(reference || model), nats per scored position
    kl_max: float
    kl_p99: float
    top1_agreement: float


@torch.inference_mode()
def window_log_probs(model, stream: torch.Tensor, scheme: Scheme, batch: int = 4) -> torch.Tensor:
    """fp32 log-probabilities at the scored positions [n_scored, vocab], in Scheme.targets order."""
    from shunter.model.executor import Batch

    starts = scheme.starts(len(stream))
    out = []
    for first in range(0, len(starts), batch):
        inputs = torch.stack([stream[s : s + scheme.window - 1] for s in starts[first : first + batch]])
        B, T = inputs.shape
        forward = Batch(inputs, torch.arange(T).expand(B, T), torch.ones(B, T, dtype=torch.bool), 0)
        log_probs = model.forward(forward).float().log_softmax(-1)
        out.append(log_probs[:, scheme.score_from :].reshape(-1, log_probs.shape[-1]))
    return torch.cat(out)


def score(
    reference_log_probs: torch.Tensor, log_probs: torch.Tensor, targets: torch.Tensor, scored_bytes: int
) -> Scores:
    """One model's scores from its log-probabilities [n, vocab] at the scored positions, the
    reference's at the same positions and the targets [n]."""
    nats = -float(log_probs.gather(1, targets[:, None]).sum())
    kl = (reference_log_probs.exp() * (reference_log_probs - log_probs)).sum(-1)
    return Scores(
        nats / math.log(2) / scored_bytes,
        float(kl.mean()),
        float(kl.max()),
        float(torch.quantile(kl, 0.99)),
        float((reference_log_probs.argmax(-1) == log_probs.argmax(-1)).float().mean()),
    )


# ---- the comparison ----


def _named_paths(pairs: list[str], flag: str) -> dict[str, str]:
    named = {}
    for pair in pairs:
        name, sep, path = pair.partition("=")
        if not sep or not name or not path:
            raise ShunterError(f"{flag} {pair!r}: expected NAME=PATH")
        named[name] = path
    return named


def compare(args: argparse.Namespace) -> dict:
    from shunter.model.loader import load_model, resolve_model_dir
    from shunter.model.quality import builtin_heldout_stream

    binary = str(Path(args.llama_bin) / "llama-perplexity")
    if not Path(binary).is_file():
        raise ShunterError(
            f"--llama-bin {args.llama_bin}: no llama-perplexity there "
            "(in llama.cpp: cmake --build build --target llama-perplexity)"
        )
    llama_models = _named_paths(args.llama, "--llama")
    for flag, path in [("--llama-base", args.llama_base), *(("--llama", p) for p in llama_models.values())]:
        if not Path(path).is_file():
            raise ShunterError(f"{flag} {path}: no such GGUF file")
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    reference_dir = resolve_model_dir(args.reference)
    dtype = None if args.activations == "checkpoint" else "float32"
    reference = load_model(reference_dir, dtype=dtype)
    if reference.tokenizer is None:
        raise ShunterError(f"{reference_dir}: needs the model's tokenizer.json")
    stream = builtin_heldout_stream(reference.tokenizer, args.tokens)
    text = reference.tokenizer.decode(stream.tolist())
    if reference.tokenizer.encode(text) != stream.tolist():
        raise ShunterError(
            "the held-out tokens do not survive decode and re-encode; llama.cpp would see others"
        )
    text_file = workdir / f"heldout-{args.tokens}.txt"
    text_file.write_bytes(text.encode("utf-8"))
    token_bytes = byte_level_token_bytes(reference_dir / "tokenizer.json")

    shunter_models = {"bf16": reference.model} | {
        name: load_model(path, dtype=dtype).model
        for name, path in _named_paths(args.shunter, "--shunter").items()
    }
    result: dict = {
        "tokens": args.tokens,
        "text_bytes": len(text.encode("utf-8")),
        "shunter_activations": args.activations,
        "schemes": {},
    }
    for scheme in (strided(args.window), halves(args.window)):
        targets = scheme.targets(len(stream))
        scored_bytes = int(token_bytes[stream[targets].numpy()].sum())
        entry: dict = {"scheme": asdict(scheme), "scored_tokens": len(targets), "scored_bytes": scored_bytes}
        log_probs = {name: window_log_probs(m, stream, scheme) for name, m in shunter_models.items()}
        target_ids = stream[targets]
        entry["shunter"] = {
            name: asdict(score(log_probs["bf16"], lp, target_ids, scored_bytes))
            for name, lp in log_probs.items()
        }
        del log_probs
        llama: dict = {}
        if scheme.name == "strided":  # bits per byte only: --kl-divergence has no strided mode
            for name, gguf in ({"bf16": args.llama_base} | llama_models).items():
                ppl = parse_perplexity(
                    run_llama(perplexity_argv(binary, gguf, str(text_file), scheme, args.threads))
                )
                llama[name] = {"ppl": ppl, "bits_per_byte": bits_per_byte(ppl, len(targets), scored_bytes)}
        else:
            base_kld = str(workdir / f"base-c{scheme.window}.kld")
            argv = perplexity_argv(binary, args.llama_base, str(text_file), scheme, args.threads)
            ppl = parse_perplexity(run_llama([*argv, "--kl-divergence-base", base_kld]))
            llama["bf16"] = {"ppl": ppl, "bits_per_byte": bits_per_byte(ppl, len(targets), scored_bytes)}
            for name, gguf in llama_models.items():
                argv = perplexity_argv(binary, gguf, str(text_file), scheme, args.threads)
                kl = parse_kl_divergence(
                    run_llama([*argv, "--kl-divergence-base", base_kld, "--kl-divergence"])
                )
                kl["bits_per_byte"] = bits_per_byte(kl["ppl"], len(targets), scored_bytes)
                llama[name] = kl
        entry["llama"] = llama
        result["schemes"][scheme.name] = entry
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m shunter.bench.quality", description=__doc__)
    p.add_argument("--llama-bin", required=True, help="llama.cpp's build/bin (llama-perplexity)")
    p.add_argument("--workdir", required=True, help="where the text file and base log-probabilities go")
    p.add_argument("--reference", default="shunter-tiny", help="the bf16 model (default: shunter-tiny)")
    p.add_argument("--shunter", action="append", default=[], metavar="NAME=DIR", help="a quantised copy")
    p.add_argument("--llama-base", required=True, help="the reference converted to GGUF (bf16)")
    p.add_argument("--llama", action="append", default=[], metavar="NAME=GGUF", help="a quantised GGUF")
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--window", type=int, default=256, help="tokens a window holds (llama.cpp pads to 256)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--activations",
        choices=("float32", "checkpoint"),
        default="float32",
        help="Shunter's activation dtype: float32 (default) computes as ggml does, fp32 activations over "
        "the stored weights, so both sides' KL counts the quantisation alone; checkpoint keeps the "
        "checkpoint's dtype (bf16 activations, whose own rounding adds KL 0.00018 here)",
    )
    p.add_argument("--out", help="write the result JSON here")
    args = p.parse_args(argv)
    try:
        result = compare(args)
    except ShunterError as exc:
        print(f"shunter: error: {exc}", file=sys.stderr)
        return 2
    text = json.dumps(result, indent=1)
    if args.out:
        with atomic_output(args.out) as f:
            f.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
