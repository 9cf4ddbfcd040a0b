"""Tile configs of the fused MoE kernels: tuned per shape and batch size (JSON in ``configs/``),
with a heuristic for shapes that were not tuned.

A JSON file maps ``"<fmt>:E<experts>:H<hidden>:I<intermediate>:k<top_k>"`` to ``{"<tokens>": config}``;
a batch takes the config of the smallest tuned token count at or above it (:func:`pick_tuned`).
Files are written on the GPU by ``benchmarks/sweep_moe_gpu.py --write``.
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

CONFIG_DIR = Path(__file__).with_name("configs")


@dataclass(frozen=True)
class GemmConfig:
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 2
    split_k: int = 1  # K splits of the projection
    unpack: str = "planes"  # GPTQ tiles: "planes" (word planes), "join" or "repeat" (whole tile, weight_tiles)


@dataclass(frozen=True)
class MoEConfig:
    path: str  # "gemv", "grouped" or "gemm" (fused_moe)
    up: GemmConfig
    down: GemmConfig
    block_m: int = 16  # rows of an expert block (grouped, gemm)

    def to_json(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_json(d: dict) -> MoEConfig:
        return MoEConfig(d["path"], GemmConfig(**d["up"]), GemmConfig(**d["down"]), d.get("block_m", 16))


def shape_key(fmt: str, e: int, h: int, inter: int, top_k: int) -> str:
    return f"{fmt}:E{e}:H{h}:I{inter}:k{top_k}"


def device_file(device: torch.device) -> Path:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return CONFIG_DIR / f"fused_moe_{name.replace(' ', '_')}.json"


@functools.lru_cache(maxsize=8)
def _load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


INTERPRETER = MoEConfig("gemm", GemmConfig(16, 32), GemmConfig(16, 32), 16)


def default_moe_config(fmt: str, e: int, h: int, inter: int, top_k: int, tokens: int) -> MoEConfig:
    """Heuristic: gemv while pairs rarely share an expert, else 16/64-row expert blocks.

    The gemv reads whole tiles (``unpack="join"``), one K tile a program: the shape that won on
    every tuned shape at 1-16 tokens (``benchmarks/sweep_moe_gpu.py``)."""
    pairs = tokens * top_k
    if pairs <= max(e, 8):
        up = GemmConfig(128, 128, 4, 2, -(-h // 128), "join")
        down = GemmConfig(256, 64, 4, 2, -(-inter // 64), "join")
        return MoEConfig("gemv", up, down)
    block_m = 16 if pairs <= 4 * e else 64
    return MoEConfig("gemm", GemmConfig(64, 64, 4, 3), GemmConfig(64, 64, 4, 3), block_m)


@functools.lru_cache(maxsize=4096)
def pick_moe_config(fmt: str, e: int, h: int, inter: int, top_k: int, tokens: int, device: torch.device) -> MoEConfig:
    """The tuned config for this shape and batch, else the heuristic (see :func:`pick_tuned`)."""
    if device.type != "cuda":
        return INTERPRETER
    tuned = _load(device_file(device))
    found = pick_tuned(tuned, fmt, e, h, inter, top_k, tokens)
    return found if found is not None else default_moe_config(fmt, e, h, inter, top_k, tokens)


def pick_tuned(tuned: dict, fmt: str, e: int, h: int, inter: int, top_k: int, tokens: int) -> MoEConfig | None:
    """The config of the smallest tuned batch at or above ``tokens`` for this format, else for int4
    (formats not tuned at a size borrow the int4 tiles: same loops, other bytes per weight); None
    past the largest tuned batch of both."""
    for key in dict.fromkeys((shape_key(fmt, e, h, inter, top_k), shape_key("int4", e, h, inter, top_k))):
        table = tuned.get(key, {})
        pick = min((int(t) for t in table if int(t) >= tokens), default=None)
        if pick is not None:
            return MoEConfig.from_json(table[str(pick)])
    return None
