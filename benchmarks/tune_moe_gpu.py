"""Tune the fused MoE tile configs on the GPU and write them as data (``kernels/configs/fused_moe_<GPU>.json``).

    PYTHONPATH=python python benchmarks/tune_moe_gpu.py [--shapes a,b] [--fmts int4,fp8_block] [--tokens 1,16]
        [--out FILE]

For each shape, weight format and batch size, candidate configs are timed on the whole layer
(CUDA graph, uniform routing, inputs rotated past L2), greedily: kernel shape (gemv / gemm and its
BLOCK_M), then the gate/up GEMM's tile, then the down GEMM's. Each winner is checked against float64.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

import moe_bench_lib as lib  # noqa: E402

from sglang.srt.enhanced.mixed_precision.kernels.fused_moe import fused_moe_fp8, fused_moe_gptq  # noqa: E402
from sglang.srt.enhanced.mixed_precision.kernels.moe_configs import (  # noqa: E402
    GemmConfig,
    MoEConfig,
    default_moe_config,
    device_file,
    shape_key,
)

GEMV_UP = [GemmConfig(32, 256, 4, 3), GemmConfig(64, 256, 4, 3), GemmConfig(16, 512, 4, 3), GemmConfig(32, 128, 4, 4)]
GEMV_DOWN = [GemmConfig(64, 256, 4, 3), GemmConfig(128, 128, 4, 3), GemmConfig(32, 256, 4, 3)]
GEMM_TILES = [GemmConfig(64, 128, 4, 3), GemmConfig(128, 128, 8, 3), GemmConfig(128, 64, 4, 4), GemmConfig(64, 64, 4, 3)]


def splits(pairs: int, n: int, k: int, block: GemmConfig) -> int:
    tiles = pairs * -(-n // block.block_n)
    return max(1, min(-(-k // block.block_k), -(-264 // tiles)))


def time_cfg(fn, w13, w2, sets, cfg) -> float:
    try:
        return lib.graph_time_us([lambda s=s: fn(s[0], w13, w2, s[1], s[2], config=cfg) for s in sets], replays=6)
    except Exception as e:  # a tile that does not compile or fit is skipped
        print(f"   skip {cfg}: {type(e).__name__} {str(e)[:80]}", flush=True)
        return float("inf")


def tune_one(fmt, e, top_k, h, inter, t, w13, w2, gen) -> tuple[MoEConfig, float, float]:
    fn = fused_moe_fp8 if fmt.startswith("fp8") else fused_moe_gptq
    rot = 8 if t <= 64 else 2
    sets = []
    for _ in range(rot):
        x = (torch.randn(t, h, device=lib.DEV, generator=gen) * 0.5).to(torch.bfloat16)
        sets.append((x, *lib.routing(t, e, top_k, 0.0, gen)))
    pairs = t * top_k
    starts = [default_moe_config(fmt, e, h, inter, top_k, t)]
    if pairs <= 2 * e:
        starts.append(MoEConfig("gemv", GEMV_UP[0], replace(GEMV_DOWN[0], split_k=splits(pairs, h, inter, GEMV_DOWN[0]))))
    for bm in (16, 32, 64, 128):
        if pairs / e >= bm / 4 or bm == 16:
            starts.append(MoEConfig("gemm", GEMM_TILES[0], GEMM_TILES[0], bm))
    scored = [(time_cfg(fn, w13, w2, sets, c), c) for c in dict.fromkeys(starts)]
    best_us, best = min(scored, key=lambda s: s[0])
    if best.path == "gemv":
        ups = [replace(best, up=replace(u, split_k=s)) for u in GEMV_UP
               for s in {1, splits(pairs, inter, h, u), 2 * splits(pairs, inter, h, u)}]  # fmt: skip
        best_us, best = min([(best_us, best)] + [(time_cfg(fn, w13, w2, sets, c), c) for c in ups if c != best],
                            key=lambda s: s[0])  # fmt: skip
        downs = [replace(best, down=replace(d, split_k=s)) for d in GEMV_DOWN
                 for s in {1, splits(pairs, h, inter, d), 2 * splits(pairs, h, inter, d)}]  # fmt: skip
    else:
        ups = [replace(best, up=u) for u in GEMM_TILES]
        best_us, best = min([(best_us, best)] + [(time_cfg(fn, w13, w2, sets, c), c) for c in ups if c != best],
                            key=lambda s: s[0])  # fmt: skip
        downs = [replace(best, down=d) for d in GEMM_TILES]
    best_us, best = min([(best_us, best)] + [(time_cfg(fn, w13, w2, sets, c), c) for c in downs if c != best],
                        key=lambda s: s[0])  # fmt: skip
    x, tw, ti = sets[0]
    err = lib.check(lambda: fn(x, w13, w2, tw, ti, config=best), x, w13, w2, tw, ti, gen)
    return best, best_us, err


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default=",".join(lib.SHAPES))
    ap.add_argument("--fmts", default="int4,fp8_block")
    ap.add_argument("--tokens", default=",".join(map(str, lib.TOKENS)))
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--budget-s", type=float, default=1e9, help="stop tuning (keep what is done) after this long")
    args = ap.parse_args()
    out = args.out or device_file(lib.DEV)
    table = json.loads(out.read_text()) if out.exists() else {}
    gen = torch.Generator(device=lib.DEV).manual_seed(5)
    t0 = time.time()
    for shape in args.shapes.split(","):
        e, top_k, h, inter = lib.SHAPES[shape]
        for fmt in args.fmts.split(","):
            if fmt == "fp8_block":
                w13, w2 = lib.fp8_experts(e, h, 2 * inter, gen=gen), lib.fp8_experts(e, inter, h, gen=gen)
            else:
                bits = int(fmt[3:])
                w13 = lib.gptq_experts(e, h, 2 * inter, bits, 128, gen=gen)
                w2 = lib.gptq_experts(e, inter, h, bits, 128, gen=gen)
            key = shape_key(fmt, e, h, inter, top_k)
            entry = table.setdefault(key, {})
            for t in (int(v) for v in args.tokens.split(",")):
                if time.time() - t0 > args.budget_s:
                    print(f"time budget spent: {key} T={t} keeps the heuristic", flush=True)
                    continue
                cfg, us, err = tune_one(fmt, e, top_k, h, inter, t, w13, w2, gen)
                entry[str(t)] = cfg.to_json()
                print(f"{shape:16s} {fmt:9s} T={t:5d} {us:8.1f} us err={err:.1e} {cfg}", flush=True)
                if not err < 2e-2:
                    raise SystemExit(f"tuned config fails the float64 check: {err}")
            del w13, w2
            torch.cuda.empty_cache()
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    print(f"wrote {out} ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
