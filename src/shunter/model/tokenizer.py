"""Tokenizer of a model directory (`tokenizer.json`, read with the `tokenizers` library)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer

from shunter.errors import ShunterError

END_OF_TEXT = "<|endoftext|>"


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

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts)]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def token_id(self, token: str) -> int:
        token_id = self._tok.token_to_id(token)
        if token_id is None:
            raise ShunterError(f"{self.path}: the tokenizer has no token {token!r}")
        return token_id


def train_byte_level_bpe(texts: Iterable[str], vocab_size: int, out_file: str | Path) -> Path:
    """Train a byte-level BPE tokenizer (lossless on any text) and save it as tokenizer.json.

    Special tokens: <|endoftext|> (id 0) separates documents.
    """
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tokenizer = _HFTokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_file))
    return out_file
