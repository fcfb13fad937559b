"""`make demo`: generate with a small MoE model and print the speed figures.

The built-in trained model completes a Python prompt. Without it (a checkout that lacks the
shipped weights), the demo builds a small Mixtral-layout model with
deterministic random weights (so its text is noise) and a BPE tokenizer trained on a few
Python standard-library files, then runs `shunter generate` on a Python prompt.
"""

from __future__ import annotations

import shlex
import sys
import sysconfig
from pathlib import Path

from shunter.cli import main as cli_main
from shunter.model.export import mixtral_config, random_weights, save_checkpoint
from shunter.model.loader import DEFAULT_MODEL, builtin_models
from shunter.model.spec import spec_from_config
from shunter.model.tokenizer import train_byte_level_bpe

DEMO_DIR = Path(".shunter-demo") / "tiny-random-mixtral"
PROMPT = "def fibonacci(n):"


def build_demo_model(out_dir: Path) -> Path:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in sorted(stdlib.glob("*.py"))[:40]]
    tokenizer_file = train_byte_level_bpe(texts, vocab_size=2048, out_file=out_dir.parent / "tokenizer.json")
    config = mixtral_config(
        vocab_size=2048,
        hidden_size=256,
        num_layers=4,
        num_heads=8,
        num_kv_heads=4,
        num_experts=8,
        top_k=2,
        intermediate_size=512,
        max_position_embeddings=1024,
        eos_token_id=0,
    )
    weights = random_weights(spec_from_config(config), seed=0)
    return save_checkpoint(config, weights, out_dir, tokenizer_json=tokenizer_file)


def main() -> int:
    if DEFAULT_MODEL in builtin_models():
        args = [
            "--prompt",
            PROMPT,
            "--max-new-tokens",
            "64",
            "--temperature",
            "0.7",
            "--top-p",
            "0.9",
            "--seed",
            "1",
        ]
        print(
            f"$ {shlex.join(['shunter', 'generate', *args])}   # the built-in {DEFAULT_MODEL}",
            file=sys.stderr,
        )
        return cli_main(["generate", *args])
    if not (DEMO_DIR / "config.json").is_file():
        print(f"building the demo model in {DEMO_DIR} (random weights, deterministic) ...", file=sys.stderr)
        build_demo_model(DEMO_DIR)
    args = ["generate", str(DEMO_DIR), "--prompt", PROMPT, "--max-new-tokens", "32"]
    print(f"$ {shlex.join(['shunter', *args])}", file=sys.stderr)  # quoted: it can be pasted into a shell
    return cli_main(args)


if __name__ == "__main__":
    sys.exit(main())
