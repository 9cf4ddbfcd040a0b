"""Which tuned tile config a batch takes (hand-made tables)."""

from __future__ import annotations

from sglang.srt.enhanced.mixed_precision.kernels.moe_configs import (
    GemmConfig,
    MoEConfig,
    pick_tuned,
    shape_key,
)

SHAPE = (8, 64, 32, 2)  # experts, hidden, intermediate, top_k


def _cfg(block_n: int) -> dict:
    return MoEConfig("gemv", GemmConfig(block_n, 32), GemmConfig(block_n, 32)).to_json()


def _pick(tuned: dict, fmt: str, tokens: int) -> int | None:
    found = pick_tuned(tuned, fmt, *SHAPE, tokens)
    return None if found is None else found.up.block_n


def test_smallest_tuned_batch_at_or_above() -> None:
    tuned = {shape_key("int4", *SHAPE): {"1": _cfg(16), "16": _cfg(32), "256": _cfg(64)}}
    assert [_pick(tuned, "int4", t) for t in (1, 2, 16, 17, 256)] == [16, 32, 32, 64, 64]


def test_past_the_largest_tuned_batch_is_the_heuristics() -> None:
    assert _pick({shape_key("int4", *SHAPE): {"4": _cfg(16)}}, "int4", 5) is None
    assert _pick({}, "int4", 1) is None


def test_a_format_borrows_int4_tiles_where_it_is_not_tuned() -> None:
    tuned = {shape_key("int4", *SHAPE): {"1": _cfg(16), "64": _cfg(64)},
             shape_key("fp8_block", *SHAPE): {"1": _cfg(128), "4": _cfg(256)}}
    assert [_pick(tuned, "fp8_block", t) for t in (1, 4, 5, 64, 65)] == [128, 256, 64, 64, None]
