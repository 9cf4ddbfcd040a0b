"""Shared fixtures: tiny MoE checkpoints built once per session (nothing is downloaded)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory: pytest.TempPathFactory):
    """``make(arch, dtype=torch.bfloat16, seed=0) -> Path`` of a cached tiny checkpoint."""
    import torch

    from sglang.srt.enhanced.tools.tiny_models import build_tiny_model

    cache: dict[tuple, Path] = {}

    def make(arch: str, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> Path:
        key = (arch, dtype, seed)
        if key not in cache:
            out = tmp_path_factory.mktemp(f"{arch}-{str(dtype).split('.')[-1]}-{seed}")
            cache[key] = build_tiny_model(arch, out, seed=seed, dtype=dtype)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def demo_checkpoints() -> dict[str, Path]:
    """The demo checkpoints in ``<repo>/demo`` that the shipped config points at (built once, kept)."""
    from sglang.srt.enhanced.tools.demo import build_demo

    return build_demo(Path(__file__).resolve().parents[1] / "demo")
