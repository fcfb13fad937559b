"""Training text: Python sources split into train and held-out by file, and their token streams."""

from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shunter.errors import ShunterError
from shunter.model.tokenizer import END_OF_TEXT, Tokenizer


def stdlib_dir() -> Path:
    """The standard library directory of the interpreter running this code."""
    return Path(sysconfig.get_paths()["stdlib"])


def python_files(root: Path) -> list[Path]:
    """Every *.py under root (site-packages excluded: it is not the interpreter's own code), sorted."""
    if not root.exists():
        raise ShunterError(f"{root}: corpus path not found")
    if root.is_file():
        return [root]
    return sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and p.is_file())


def is_heldout(path: Path, root: Path, heldout_percent: int) -> bool:
    """A stable split by file: the same file lands on the same side on every machine."""
    relative = path.relative_to(root).as_posix() if path != root else path.name
    return int(hashlib.sha1(relative.encode()).hexdigest(), 16) % 100 < heldout_percent


@dataclass
class Corpus:
    root: Path
    train_files: list[Path]
    heldout_files: list[Path]

    @staticmethod
    def from_path(root: Path, heldout_percent: int = 5) -> Corpus:
        files = python_files(root)
        if not files:
            raise ShunterError(f"{root}: corpus is empty (no *.py files)")
        train = [f for f in files if not is_heldout(f, root, heldout_percent)]
        heldout = [f for f in files if is_heldout(f, root, heldout_percent)]
        if not train or not heldout:
            # too few files for a file-level split: fall back to alternate files
            train, heldout = files[1::2] or files, files[0::2]
        return Corpus(root, train, heldout)


def read_texts(files: list[Path]) -> list[str]:
    texts = [f.read_text(encoding="utf-8", errors="replace") for f in files]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise ShunterError(f"{files[0].parent if files else 'corpus'}: corpus is empty (every file is blank)")
    return texts


def token_stream(tokenizer: Tokenizer, texts: list[str]) -> np.ndarray:
    """All texts as one int32 token stream, each followed by the end-of-text token."""
    eot = tokenizer.token_id(END_OF_TEXT)
    pieces = []
    for ids in tokenizer.encode_batch(texts):
        pieces.append(np.asarray(ids, dtype=np.int32))
        pieces.append(np.asarray([eot], dtype=np.int32))
    return np.concatenate(pieces)
