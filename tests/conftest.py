from __future__ import annotations

import pytest

from tests.tiny_models import save_tiny


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """tiny_checkpoint(family, fused=False, dtype=float32, max_shard_size=None) -> saved directory.

    Each distinct checkpoint is built once per session."""
    cache: dict[tuple, object] = {}

    def build(family: str, fused: bool = False, dtype=None, max_shard_size: str | None = None):
        import torch

        dtype = dtype or torch.float32
        key = (family, fused, dtype, max_shard_size)
        if key not in cache:
            name = (
                f"{family}-{'fused' if fused else 'per_expert'}-{str(dtype)[6:]}-{max_shard_size or 'single'}"
            )
            cache[key] = save_tiny(family, tmp_path_factory.mktemp(name), fused, dtype, max_shard_size)
        return cache[key]

    return build
