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


@pytest.fixture
def sglang_expert_location(monkeypatch: pytest.MonkeyPatch):
    """``read(model_dir, path) -> (logical_count, metadata)``: SGLang's own ``--init-expert-location`` reader.

    SGLang 0.4.7's ``compute_initial_expert_location_metadata`` reads the file and hands its
    ``logical_count`` to EPLB; what it read is captured on the way. This process stands for EP rank 0.
    """
    import torch

    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.managers import expert_location
    from sglang.srt.server_args import ServerArgs

    read: dict = {}
    real = expert_location.ExpertLocationMetadata.init_by_eplb

    def init_by_eplb(server_args, model_config, logical_count):  # noqa: ANN001, ANN202
        read["logical_count"] = logical_count
        return real(server_args, model_config, logical_count)

    monkeypatch.setattr(expert_location.ExpertLocationMetadata, "init_by_eplb", staticmethod(init_by_eplb))
    monkeypatch.setattr(torch.distributed, "get_rank", lambda *_a, **_k: 0)

    def read_file(model_dir: Path, path: Path):  # noqa: ANN202
        args = ServerArgs(model_path=str(model_dir), device="cpu", init_expert_location=str(path))
        metadata = expert_location.compute_initial_expert_location_metadata(args, ModelConfig.from_server_args(args))
        return read["logical_count"], metadata

    return read_file
