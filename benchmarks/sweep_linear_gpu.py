"""Sweep packed linear tile configs on one GPU against torch bf16 ``F.linear`` (cuBLAS).

    PYTHONPATH=python python benchmarks/sweep_linear_gpu.py [--shapes mixtral-q/o,...] [--tokens 1,4,16]
        [--unpacks planes,join,repeat] [--top 3]

For each dense shape of ``bench_moe_gpu.LINEAR_SHAPES`` and row count: GPU time (CUDA-graph replays over
four weights, so no weight stays in L2) of the config ``pick_linear_config`` gives today and of every
candidate (CUDA-core rows or tensor-core tiles x tile sizes x GPTQ unpack x K tiles per program),
int4 group 128; the best few are printed, the winner checked against float64. The last line per shape
and row count compares the winner with cuBLAS bf16.
"""

from __future__ import annotations

import argparse
import sys
from itertools import product
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))

import moe_bench_lib as lib  # noqa: E402
from bench_moe_gpu import LINEAR_SHAPES  # noqa: E402

from sglang.srt.enhanced.mixed_precision.kernels.packed_linear import (  # noqa: E402
    LinearConfig,
    gptq_linear,
    gptq_linear_ref,
    pick_linear_config,
)

ROW_TILES = ((32, 128), (64, 128), (128, 64), (32, 256), (64, 256), (128, 128))
DOT_TILES = ((64, 64), (64, 128), (128, 64), (128, 128))
TILES_PER_PROGRAM = (1, 2, 4)


def candidates(m: int, k: int, unpacks: list[str]) -> list[LinearConfig]:
    """CUDA-core rows (small tiles only for more than 4 rows) and tensor-core tiles, K split to 1-4 tiles a program."""
    out = []
    for u, (bn, bk), tpp in product(unpacks, ROW_TILES, TILES_PER_PROGRAM):
        if m * bn * bk <= 4 * 256 * 128 and bk <= k:  # the [rows, N, K] product stays in registers
            out.append(LinearConfig(m, bn, bk, 4, 2, -(-k // (bk * tpp)), use_dot=False, unpack=u))
    for u, (bn, bk), tpp in product(unpacks, DOT_TILES, TILES_PER_PROGRAM):
        if bk <= k:
            out.append(LinearConfig(16 if m <= 16 else 64, bn, bk, 4, 3, -(-k // (bk * tpp)), unpack=u))
    return out


def timed(cfg: LinearConfig, xs: list[torch.Tensor], ws: list) -> float:
    return lib.graph_time_us([lambda x=x, w=w: gptq_linear(x, w, config=cfg) for x, w in zip(xs, ws, strict=True)])


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref).norm() / ref.norm()) if not torch.isnan(y).any() else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=",".join(list(LINEAR_SHAPES)[2:]))
    ap.add_argument("--tokens", default="1,4,16")
    ap.add_argument("--unpacks", default="planes,join,repeat")
    ap.add_argument("--top", type=int, default=3)
    args = ap.parse_args()
    print(lib.device_card(lib.copy_bandwidth()), flush=True)
    gen = torch.Generator(device=lib.DEV).manual_seed(1)
    table = []
    for name in args.shapes.split(","):
        k, n = LINEAR_SHAPES[name]
        stacked = [lib.gptq_experts(1, k, n, 4, 128, gen=gen) for _ in range(4)]
        ws = [type(w)(w.qweight[0], w.qzeros[0], w.scales[0], None, 4, 128, 1) for w in stacked]
        dense = [lib.expert_f64(w, 0).to(torch.bfloat16) for w in stacked]
        for m in (int(t) for t in args.tokens.split(",")):
            xs = [torch.randn(m, k, device=lib.DEV, generator=gen).to(torch.bfloat16) for _ in ws]
            ref = gptq_linear_ref(xs[0], ws[0])

            cublas = lib.graph_time_us([lambda x=x, d=d: F.linear(x, d) for x, d in zip(xs, dense, strict=True)])
            today = pick_linear_config("int4", m, n, k, lib.DEV)
            today_us = timed(today, xs, ws)
            ranked = [(today_us, today)]
            for cfg in candidates(m, k, args.unpacks.split(",")):
                try:
                    ranked.append((timed(cfg, xs, ws), cfg))
                except Exception as e:  # noqa: BLE001 - a tile that does not compile is skipped
                    print(f"  skipped {cfg}: {type(e).__name__}", flush=True)
            ranked.sort(key=lambda r: r[0])
            best_us, best = ranked[0]
            err = rel_err(gptq_linear(xs[0], ws[0], config=best), ref)
            for us, cfg in ranked[: args.top]:
                print(f"  {name} M={m} {us:8.1f} us {cfg}", flush=True)
            line = (f"{name:40s} M={m:3d} cuBLAS bf16 {cublas:7.1f} us | today {today_us:7.1f}"
                    f" | best {best_us:7.1f} (x{cublas / best_us:4.2f} cuBLAS, err {err:.1e}) {best}")  # fmt: skip
            print(line, flush=True)
            table.append(line)
        del stacked, ws, dense
        torch.cuda.empty_cache()
    print("\n".join(table))


if __name__ == "__main__":
    main()
