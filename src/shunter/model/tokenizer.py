"""Tokenizer of a model directory (`tokenizer.json`, read with the `tokenizers` library)."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer

from shunter.errors import ShunterError


class Tokenizer:
    def __init__(self, path: Path) -> None:
        try:
            self._tok = _HFTokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises plain Exception subclasses
            raise ShunterError(f"{path}: cannot read tokenizer: {exc}") from None
        self.path = path

    @staticmethod
    def from_model_dir(model_dir: Path) -> Tokenizer | None:
        path = Path(model_dir) / "tokenizer.json"
        return Tokenizer(path) if path.is_file() else None

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)
