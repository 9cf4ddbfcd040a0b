"""Fused MoE kernels (both shapes: gemv and expert-blocked gemm) vs the float64 reference."""

from __future__ import annotations

import os
import sys

import torch

if not torch.cuda.is_available():  # before the kernel module defines its kernels
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(__file__))

import pytest  # noqa: E402
from moe_cases import make_fp8, make_gptq, make_routing, rel_err  # noqa: E402
from poison import poisoned  # noqa: E402, F401

from sglang.srt.enhanced.errors import EnhancedError  # noqa: E402
from sglang.srt.enhanced.mixed_precision.kernels.fused_moe import (  # noqa: E402
    _expert_weights_f64,
    fused_moe_fp8,
    fused_moe_gptq,
    fused_moe_ref,
    fused_moe_sets,
)
from sglang.srt.enhanced.mixed_precision.kernels.moe_configs import GemmConfig, MoEConfig  # noqa: E402
from sglang.srt.enhanced.mixed_precision.kernels.packed_weights import FP8Experts  # noqa: E402

GEMV = MoEConfig("gemv", GemmConfig(32, 32), GemmConfig(32, 32, split_k=2))
GEMM = MoEConfig("gemm", GemmConfig(32, 32), GemmConfig(32, 32), block_m=16)
GROUPED = MoEConfig("grouped", GemmConfig(16, 32), GemmConfig(32, 16), block_m=4)
# Relative Frobenius error: bf16 activations and a bf16 intermediate (act(gate) * up).
REL_TOL = {torch.bfloat16: 1.5e-2, torch.float16: 3e-3}


GPTQ_CASES = [
    # bits, group, act_order, split g_idx, sym, zero_offset, hidden, inter, tokens, experts, top_k, path
    (4, 16, False, False, False, 1, 48, 24, 5, 4, 2, GEMV),  # groups span the tile, partial tiles
    (4, 32, False, False, True, 1, 48, 24, 5, 4, 2, GEMM),  # tile inside one group, padded blocks
    (4, -1, False, False, False, 0, 32, 40, 3, 3, 3, GEMM),  # one group, gptq_v2, all experts used
    (4, 16, True, False, False, 1, 32, 16, 4, 4, 2, GEMV),  # act-order
    (4, 16, True, True, False, 1, 32, 16, 4, 4, 2, GEMM),  # act-order, gate and up with their own g_idx
    (8, 24, False, False, False, 0, 48, 24, 3, 4, 2, GEMV),  # 8-bit, groups cut across tiles
    (8, 24, False, False, False, 0, 48, 24, 5, 4, 2, GROUPED),
    (4, 16, True, True, False, 1, 32, 16, 6, 4, 2, GROUPED),  # act-order with two g_idx, blocks of 4 rows
    (3, 32, False, False, False, 1, 32, 32, 6, 3, 2, GROUPED),
    (8, 32, False, False, True, 1, 32, 32, 3, 4, 2, GEMM),
    (2, 32, False, False, False, 1, 32, 32, 3, 4, 2, GEMV),
    (2, -1, False, False, True, 0, 32, 16, 2, 2, 2, GEMM),
    (3, 32, False, False, False, 1, 32, 32, 3, 4, 2, GEMV),
    (3, 32, True, False, False, 1, 32, 32, 3, 4, 2, GEMM),
]


@pytest.mark.parametrize("case", GPTQ_CASES, ids=lambda c: f"{c[0]}bit-g{c[1]}-ao{int(c[2])}{int(c[3])}-{c[-1].path}")
def test_fused_moe_gptq(case, device, poisoned):  # noqa: F811
    bits, group, act_order, split, sym, offset, h, inter, t, e, top_k, cfg = case
    gen = torch.Generator().manual_seed(hash(case[:-1]) % 2**31)
    w13 = make_gptq(gen, e, h, 2 * inter, bits, group, act_order=act_order, split_g_idx=split, sym=sym,
                    zero_offset=offset, device=device)  # fmt: skip
    w2 = make_gptq(gen, e, inter, h, bits, group, act_order=act_order, sym=sym, zero_offset=offset, device=device)
    tw, ti = make_routing(gen, t, e, top_k, device=device)
    x = torch.randn(t, h, generator=gen).to(torch.bfloat16).to(device)
    out = torch.full((t, h), float("nan"), dtype=torch.bfloat16, device=device)
    y = fused_moe_gptq(x, w13, w2, tw, ti, out=out, config=cfg)
    assert y is out
    assert rel_err(y, fused_moe_ref(x, w13, w2, tw, ti)) < REL_TOL[torch.bfloat16]


UNPACK_CASES = [
    # bits, group, act_order, hidden, inter (K tiles of 32: groups inside, spanning, or cut across a tile)
    (4, 16, False, 48, 24),
    (4, 64, False, 80, 40),
    (8, 24, False, 48, 24),
    (2, 32, False, 32, 32),
    (4, 16, True, 32, 16),
]


@pytest.mark.parametrize("unpack", ["join", "repeat"])
@pytest.mark.parametrize("path", ["gemv", "grouped", "gemm"])
@pytest.mark.parametrize("case", UNPACK_CASES, ids=lambda c: f"{c[0]}bit-g{c[1]}-ao{int(c[2])}-h{c[3]}")
def test_whole_tile_unpack(case, path, unpack, device, poisoned):  # noqa: F811
    """GPTQ tiles read whole (words split in registers, or one load per value) instead of by word planes."""
    bits, group, act_order, h, inter = case
    gen = torch.Generator().manual_seed(bits * 100 + group + h)
    e, t, top_k = 4, 5, 2
    w13 = make_gptq(gen, e, h, 2 * inter, bits, group, act_order=act_order, device=device)
    w2 = make_gptq(gen, e, inter, h, bits, group, act_order=act_order, device=device)
    tw, ti = make_routing(gen, t, e, top_k, device=device)
    x = torch.randn(t, h, generator=gen).to(torch.bfloat16).to(device)
    up, down = GemmConfig(16, 32, split_k=2, unpack=unpack), GemmConfig(32, 32, split_k=2, unpack=unpack)
    cfg = MoEConfig(path, up, down, block_m=2 if path == "grouped" else 16)
    y = fused_moe_gptq(x, w13, w2, tw, ti, config=cfg)
    assert rel_err(y, fused_moe_ref(x, w13, w2, tw, ti)) < REL_TOL[torch.bfloat16]


FP8_CASES = [
    # block size, activation, dtype, hidden, inter, path
    ((16, 32), "silu", torch.bfloat16, 64, 40, GEMV),  # partial scale blocks at the edges
    ((16, 32), "gelu", torch.float16, 64, 40, GEMM),
    ((8, 8), "silu", torch.bfloat16, 32, 24, GEMM),  # several scale blocks inside one tile
    ((16, 32), "silu", torch.bfloat16, 64, 40, GROUPED),
    (None, "silu", torch.bfloat16, 48, 24, GEMV),  # per-channel
    (None, "gelu", torch.bfloat16, 48, 24, GEMM),
]


@pytest.mark.parametrize("case", FP8_CASES, ids=lambda c: f"{c[0]}-{c[1]}-{c[-1].path}")
def test_fused_moe_fp8(case, device, poisoned):  # noqa: F811
    block, act, dtype, h, inter, cfg = case
    gen = torch.Generator().manual_seed(7 + h)
    e, t, top_k = 4, 5, 2
    w13 = make_fp8(gen, e, h, 2 * inter, block, device=device)
    w2 = make_fp8(gen, e, inter, h, block, device=device)
    tw, ti = make_routing(gen, t, e, top_k, device=device)
    x = torch.randn(t, h, generator=gen).to(dtype).to(device)
    y = fused_moe_fp8(x, w13, w2, tw, ti, activation=act, config=cfg)
    assert y.dtype == dtype and y.shape == (t, h)
    assert rel_err(y, fused_moe_ref(x, w13, w2, tw, ti, activation=act)) < REL_TOL[dtype]


SPLIT_GATE_UP_CASES = [
    # name, hidden (3 K tiles of 32; 80 leaves the last one partly past H), activation
    ("int4-g16", 80, "silu"),
    ("int4-actorder", 96, "silu"),
    ("int3-g32", 96, "gelu"),
    ("fp8-block", 80, "gelu"),
    ("fp8-channel", 96, "silu"),
]


@pytest.mark.parametrize("path", ["gemv", "grouped", "gemm"])
@pytest.mark.parametrize("case", SPLIT_GATE_UP_CASES, ids=lambda c: c[0])
def test_gate_up_split_over_k(case, path, device, poisoned):  # noqa: F811
    """Gate/up in 3 K splits: float32 partial sums, added up and activated by the act kernel."""
    name, h, act = case
    gen = torch.Generator().manual_seed(h + len(name))
    e, t, top_k, inter = 4, 3, 2, 32
    if name.startswith("fp8"):
        block = (16, 32) if name == "fp8-block" else None
        w13, w2 = make_fp8(gen, e, h, 2 * inter, block, device=device), make_fp8(gen, e, inter, h, block, device=device)
        run = fused_moe_fp8
    else:
        bits, group = (3, 32) if name.startswith("int3") else (4, 16)
        act_order = name.endswith("actorder")
        w13 = make_gptq(gen, e, h, 2 * inter, bits, group, act_order=act_order, device=device)
        w2 = make_gptq(gen, e, inter, h, bits, group, act_order=act_order, device=device)
        run = fused_moe_gptq
    tw, ti = make_routing(gen, t, e, top_k, device=device)
    ti[1, 1] = -1  # a pair of another rank: its partial sums are never written
    x = torch.randn(t, h, generator=gen).to(torch.bfloat16).to(device)
    cfg = MoEConfig(path, GemmConfig(16, 32, split_k=3), GemmConfig(32, 32, split_k=2), block_m=16)
    y = run(x, w13, w2, tw, ti, activation=act, config=cfg)
    assert rel_err(y, fused_moe_ref(x, w13, w2, tw, ti, activation=act)) < REL_TOL[torch.bfloat16]


@pytest.mark.parametrize("cfg", [GEMV, GROUPED, GEMM], ids=["gemv", "grouped", "gemm"])
def test_pairs_of_other_ranks_contribute_nothing(cfg, device, poisoned):  # noqa: F811
    gen = torch.Generator().manual_seed(3)
    w13 = make_gptq(gen, 3, 32, 32, 4, 16, device=device)
    w2 = make_gptq(gen, 3, 16, 32, 4, 16, device=device)
    x = torch.randn(3, 32, generator=gen).to(torch.bfloat16).to(device)
    ti = torch.tensor([[0, -1], [2, 7], [-1, -1]], dtype=torch.int32, device=device)
    tw = torch.rand(3, 2, generator=gen).to(device)
    y = fused_moe_gptq(x, w13, w2, tw, ti, config=cfg)
    ref = fused_moe_ref(x, w13, w2, tw, ti)
    assert (y[2] == 0).all()
    assert rel_err(y, ref) < REL_TOL[torch.bfloat16]


def test_bad_shapes_name_the_culprit(device):
    gen = torch.Generator().manual_seed(0)
    w13 = make_gptq(gen, 2, 32, 32, 4, 16, device=device)
    w2 = make_gptq(gen, 2, 16, 32, 4, 16, device=device)
    tw, ti = make_routing(gen, 2, 2, 1, device=device)
    with pytest.raises(EnhancedError, match="hidden size"):
        fused_moe_gptq(torch.randn(2, 48, device=device).bfloat16(), w13, w2, tw, ti)
    with pytest.raises(EnhancedError, match="activation"):
        fused_moe_gptq(torch.randn(2, 32, device=device).bfloat16(), w13, w2, tw, ti, activation="relu")
    x = torch.randn(2, 32, device=device).bfloat16()
    with pytest.raises(EnhancedError, match="expert map each"):
        fused_moe_sets(x, [(w13, None), (w13, None)], [(w2, None)], tw, ti)
    with pytest.raises(EnhancedError, match="int32 \\[num_experts\\]"):
        fused_moe_sets(x, [(w13, torch.zeros(2, dtype=torch.int64, device=device))], [(w2, None)], tw, ti)


def test_down_split_past_the_intermediate_size(device, poisoned):  # noqa: F811
    """Down projection over 5 K tiles in 3 splits of 2: the last tile lies past I and its last group."""
    gen = torch.Generator().manual_seed(21)
    w13 = make_gptq(gen, 2, 32, 160, 4, 16, device=device)
    w2 = make_gptq(gen, 2, 80, 32, 4, 16, device=device)
    tw, ti = make_routing(gen, 2, 2, 1, device=device)
    x = torch.randn(2, 32, generator=gen).to(torch.bfloat16).to(device)
    cfg = MoEConfig("gemv", GemmConfig(32, 32), GemmConfig(32, 16, split_k=3))
    assert rel_err(fused_moe_gptq(x, w13, w2, tw, ti, config=cfg), fused_moe_ref(x, w13, w2, tw, ti)) < 1.5e-2


def plain_experts(gen, e, k, n, device) -> FP8Experts:
    """bf16 experts as the mixed layer hands them to the kernels: per-channel FP8 layout with unit scales."""
    w = (torch.randn(e, n, k, generator=gen) / k**0.5).to(torch.bfloat16).to(device)
    return FP8Experts(weight=w, scale=torch.ones((1, 1), device=device).expand(e, n), block_size=None)


def expert_map(experts: tuple[int, ...], num_experts: int, device) -> torch.Tensor:  # noqa: ANN001
    table = torch.full((num_experts,), -1, dtype=torch.int32)
    table[list(experts)] = torch.arange(len(experts), dtype=torch.int32)
    return table.to(device)


SPLIT_GEMV = MoEConfig("gemv", GemmConfig(16, 16, split_k=2), GemmConfig(32, 16, split_k=2))


def mixed_sets_case(device: torch.device, gen: torch.Generator):  # noqa: ANN201
    """Gate/up in int4 / FP8-block / bf16 sets, down in int4 / FP8-channel sets; routing with other ranks' pairs.

    Returns ``(gate_up, down, tw, ti, reference, x_shape)``: the sets with their expert maps, the routing,
    a float64 reference ``x -> out`` built from the global experts and the shape of ``x``.
    """
    e, h, inter, t, top_k = 5, 32, 16, 6, 2
    gate_up = {(0, 2, 4): make_gptq(gen, 3, h, 2 * inter, 4, 16, device=device),
               (1,): make_fp8(gen, 1, h, 2 * inter, (16, 16), device=device),
               (3,): plain_experts(gen, 1, h, 2 * inter, device)}  # fmt: skip
    down = {(0, 1, 2): make_gptq(gen, 3, inter, h, 4, 16, device=device),
            (3, 4): make_fp8(gen, 2, inter, h, None, device=device)}  # fmt: skip
    tw, ti = make_routing(gen, t, e, top_k, device=device)
    ti[t - 1, 1] = -1  # pairs of another rank
    ti[t - 2, 0] = e

    def global_f64(sets: dict) -> torch.Tensor:  # noqa: ANN001
        per = {g: w for ex, s in sets.items() for g, w in zip(ex, _expert_weights_f64(s), strict=True)}
        return torch.stack([per[g] for g in range(e)]).cpu()

    w13, w2 = global_f64(gate_up), global_f64(down)

    def reference(x: torch.Tensor) -> torch.Tensor:
        ref = torch.zeros(t, h, dtype=torch.float64)
        for r in range(t):
            for j in range(top_k):
                g = int(ti[r, j])
                if not 0 <= g < e:
                    continue
                gu = w13[g] @ x[r].double().cpu()
                ref[r] += float(tw[r, j]) * (w2[g] @ (torch.nn.functional.silu(gu[:inter]) * gu[inter:]))
        return ref

    sets13 = [(w, expert_map(ex, e, device)) for ex, w in gate_up.items()]
    sets2 = [(w, expert_map(ex, e, device)) for ex, w in down.items()]
    return sets13, sets2, tw, ti, reference, (t, h)


@pytest.mark.parametrize("cfg", [GEMV, SPLIT_GEMV, GROUPED, GEMM, None],
                         ids=["gemv", "gemv-split", "grouped", "gemm", "tuned"])  # fmt: skip
def test_expert_sets_in_several_formats_add_into_one_output(cfg, device, poisoned):  # noqa: F811
    """One launch per set and projection, one output.

    With gate/up split over K, each set's activation kernel must leave the other sets' pairs alone.
    """
    gen = torch.Generator().manual_seed(11)
    sets13, sets2, tw, ti, reference, shape = mixed_sets_case(device, gen)
    x = torch.randn(*shape, generator=gen).to(torch.bfloat16).to(device)
    y = fused_moe_sets(x, sets13, sets2, tw, ti, config=cfg)
    assert rel_err(y, reference(x)) < REL_TOL[torch.bfloat16]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("cfg", [SPLIT_GEMV, GROUPED, GEMM], ids=["gemv-split", "grouped", "gemm"])
def test_expert_sets_side_by_side_in_a_cuda_graph(cfg, device):
    """The sets' launches on side streams are captured as parallel branches: a replay on new inputs is right."""
    gen = torch.Generator().manual_seed(12)
    sets13, sets2, tw, ti, reference, shape = mixed_sets_case(device, gen)
    x = torch.randn(*shape, generator=gen).to(torch.bfloat16).to(device)
    out = torch.empty_like(x)
    for _ in range(2):  # warm-up outside capture, as SGLang's graph runner does
        fused_moe_sets(x, sets13, sets2, tw, ti, config=cfg, out=out)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fused_moe_sets(x, sets13, sets2, tw, ti, config=cfg, out=out)
    for seed in (13, 14):
        x.copy_(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert rel_err(out, reference(x)) < REL_TOL[torch.bfloat16]
