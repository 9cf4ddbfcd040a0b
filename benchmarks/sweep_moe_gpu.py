"""Sweep fused MoE tile configs on one GPU: the whole layer's time for every candidate, best first;
with ``--write``, the winners go into the tuned configs (``kernels/configs/fused_moe_<GPU>.json``).

    PYTHONPATH=python python benchmarks/sweep_moe_gpu.py [--shapes a,b] [--tokens 1,16] [--fmt int4] [--top 8]
        [--unpacks join,planes] [--write]

For each shape and batch, each kernel shape in turn (``fused_moe``: per-pair gemv, grouped gemv,
expert-blocked gemm): the gate/up projection's candidates with the down projection held, then the
down projection's with gate/up at the best found. Candidates: tile sizes x GPTQ unpack x K tiles
per program (x rows per expert block). The overall winner is checked against float64 before it
is printed or written; the ranking is printed, so a choice can be read back.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from itertools import product
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

import moe_bench_lib as lib  # noqa: E402

from sglang.srt.enhanced.mixed_precision.kernels.fused_moe import fused_moe_fp8, fused_moe_gptq  # noqa: E402
from sglang.srt.enhanced.mixed_precision.kernels.moe_configs import (  # noqa: E402
    GemmConfig,
    MoEConfig,
    device_file,
    pick_moe_config,
    shape_key,
)

UNPACKS = ("planes", "join", "repeat")
GEMV_TILES = ((32, 128), (64, 128), (128, 128), (32, 256), (64, 256), (128, 64), (256, 64))
GEMM_TILES = ((64, 64), (64, 128), (128, 64), (128, 128))
TILES_PER_PROGRAM = (1, 2, 4)
GROUP_ROWS = (2, 4, 8)


def split_for(k: int, block_k: int, tiles_per_program: int) -> int:
    k_tiles = -(-k // block_k)
    return max(1, -(-k_tiles // tiles_per_program))


def gemv_candidates(k: int, unpacks: tuple[str, ...], warps: tuple[int, ...]) -> list[GemmConfig]:
    return [GemmConfig(bn, bk, w, 2, split_for(k, bk, tpp), u)
            for u, (bn, bk), tpp, w in product(unpacks, GEMV_TILES, TILES_PER_PROGRAM, warps) if bk <= k]  # fmt: skip


def gemm_candidates(h: int, inter: int, t: int, unpacks: tuple[str, ...], warps: tuple[int, ...]
                    ) -> list[MoEConfig]:  # fmt: skip
    """Expert-blocked tiles, the same for both projections, whole K or K split into 1-2 tiles a program."""
    out = []
    for u, (bn, bk), w, bm, tpp in product(unpacks, GEMM_TILES, warps, (16, 64), (None, 1, 2)):
        if bm > max(16, t):
            continue
        up = GemmConfig(bn, bk, w, 3, split_for(h, bk, tpp) if tpp else 1, u)
        down = GemmConfig(bn, bk, w, 3, split_for(inter, bk, tpp) if tpp else 1, u)
        out.append(MoEConfig("gemm", up, down, bm))
    return out


def timed(fn, w13, w2, sets, cfg: MoEConfig) -> float:
    try:
        return lib.graph_time_us(
            [lambda s=s: fn(s[0], w13, w2, s[1], s[2], config=cfg) for s in sets], replays=6
        )
    except Exception as e:  # a tile that does not compile or fit
        print(f"   skip {cfg}: {type(e).__name__} {str(e)[:100]}", flush=True)
        return float("inf")


def rank(label: str, fn, w13, w2, sets, cfgs: list[MoEConfig], top: int) -> tuple[float, MoEConfig]:
    t0 = time.time()
    scored = sorted(((timed(fn, w13, w2, sets, c), c) for c in dict.fromkeys(cfgs)), key=lambda s: s[0])
    print(f"  {label}: {len(scored)} candidates in {time.time() - t0:.0f} s", flush=True)
    for us, c in scored[:top]:
        print(f"    {us:8.1f} us  {c}", flush=True)
    by_unpack: dict[tuple[str, str], float] = {}
    for us, c in scored:
        by_unpack.setdefault((c.up.unpack, c.down.unpack), us)
    print("    best per unpack (gate/up, down): "
          + ", ".join(f"{u}/{d} {us:.1f}" for (u, d), us in by_unpack.items()), flush=True)  # fmt: skip
    return scored[0]


def check_cfg(fn, w13, w2, inputs, cfg: MoEConfig, gen) -> float:
    x, tw, ti = inputs
    return lib.check(lambda: fn(x, w13, w2, tw, ti, config=cfg), x, w13, w2, tw, ti, gen)


def kernel_breakdown(fn, w13, w2, sets, cfg: MoEConfig) -> str:
    """GPU time per kernel of one layer call (torch profiler, eager calls on the rotated inputs)."""
    from torch.profiler import ProfilerActivity, profile

    for s in sets:
        fn(s[0], w13, w2, s[1], s[2], config=cfg)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for s in sets:
            fn(s[0], w13, w2, s[1], s[2], config=cfg)
        torch.cuda.synchronize()
    per = {}
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            per[ev.name] = per.get(ev.name, 0.0) + ev.device_time / len(sets)
    return ", ".join(f"{name[:40]} {us:.1f}" for name, us in sorted(per.items(), key=lambda kv: -kv[1]))


def two_stage(label, fn, w13, w2, sets, base: MoEConfig, ups, downs, top) -> tuple[float, MoEConfig]:
    """Rank the gate/up candidates with ``base``'s down tile, then the down ones with the best gate/up."""
    _, best = rank(f"{label} gate/up", fn, w13, w2, sets, [replace(base, up=c) for c in ups], top)
    return rank(f"{label} down", fn, w13, w2, sets, [replace(best, down=c) for c in downs], top)


def grouped_stage(fn, w13, w2, sets, h, inter, unpacks, warps, top) -> tuple[float, MoEConfig]:
    """Grouped gemv: gate/up tiles x rows per block (down at a fixed tile), then down tiles at the best rows."""
    tile = GemmConfig(128, 64, warps[0], 2, 1, unpacks[0])
    ups = [MoEConfig("grouped", GemmConfig(bn, bk, w, 2, 1, u), tile, bm)
           for u, (bn, bk), w, bm in product(unpacks, GEMV_TILES, warps, GROUP_ROWS) if bk <= h]  # fmt: skip
    _, best = rank("grouped gate/up", fn, w13, w2, sets, ups, top)
    downs = [
        GemmConfig(bn, bk, w, 2, 1, u)
        for u, (bn, bk), w in product(unpacks, GEMV_TILES, warps)
        if bk <= inter
    ]
    return rank("grouped down", fn, w13, w2, sets, [replace(best, down=c) for c in downs], top)


def sweep_one(fn, fmt, w13, w2, shape, t, unpacks, warps, args, gen) -> MoEConfig:
    e, top_k, h, inter = lib.SHAPES[shape]
    sets = []
    for _ in range(8 if t <= 64 else 2):
        x = (torch.randn(t, h, device=lib.DEV, generator=gen) * 0.5).to(torch.bfloat16)
        sets.append((x, *lib.routing(t, e, top_k, 0.0, gen)))
    tuned = pick_moe_config(fmt, e, h, inter, top_k, t, lib.DEV)
    tuned_us = timed(fn, w13, w2, sets, tuned)
    print(f"{shape} {fmt} T={t}: tuned {tuned} {tuned_us:.1f} us", flush=True)
    results = [(tuned_us, tuned)]  # a sweep never writes a config slower than the one in use
    pairs = t * top_k
    if pairs <= 4 * e:
        base = tuned if tuned.path == "gemv" else MoEConfig("gemv", GemmConfig(128, 128), GemmConfig(128, 64))
        results.append(two_stage("gemv", fn, w13, w2, sets, base, gemv_candidates(h, unpacks, warps),
                                 gemv_candidates(inter, unpacks, warps), args.top))  # fmt: skip
    if 8 < pairs <= 16 * e:
        results.append(grouped_stage(fn, w13, w2, sets, h, inter, unpacks, warps, args.top))
    if pairs >= 4 * e and not args.no_gemm:
        results.append(
            rank("gemm", fn, w13, w2, sets, gemm_candidates(h, inter, t, unpacks, warps), args.top)
        )
    us, best = min(results, key=lambda r: r[0])
    err = check_cfg(fn, w13, w2, sets[0], best, gen)
    print(f"  best {us:.1f} us, rel err vs float64 {err:.1e}: {best}", flush=True)
    print(f"  kernels of best (us per layer call): {kernel_breakdown(fn, w13, w2, sets, best)}", flush=True)
    if not err < 2e-2:
        raise SystemExit(f"the best config fails the float64 check: {err}")
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="qwen3-30b-a3b")
    ap.add_argument("--tokens", default="1,16")
    ap.add_argument("--fmt", default="int4")
    ap.add_argument("--top", type=int, default=4)
    ap.add_argument("--warps", default="4")
    ap.add_argument("--no-gemm", action="store_true")
    ap.add_argument("--unpacks", default="join", help="GPTQ tile reads to try (of " + ",".join(UNPACKS) + ")")
    ap.add_argument("--write", action="store_true", help="store each winner in the tuned configs")
    args = ap.parse_args()
    warps = tuple(int(w) for w in args.warps.split(","))
    unpacks = tuple(args.unpacks.split(",")) if args.fmt.startswith("int") else ("planes",)
    gen = torch.Generator(device=lib.DEV).manual_seed(5)
    print(lib.device_card(lib.copy_bandwidth()), flush=True)
    fn = fused_moe_fp8 if args.fmt.startswith("fp8") else fused_moe_gptq
    out = device_file(lib.DEV)
    for shape in args.shapes.split(","):
        e, top_k, h, inter = lib.SHAPES[shape]
        if args.fmt.startswith("fp8"):
            w13, w2 = lib.fp8_experts(e, h, 2 * inter, gen=gen), lib.fp8_experts(e, inter, h, gen=gen)
        else:
            w13 = lib.gptq_experts(e, h, 2 * inter, int(args.fmt[3:]), 128, gen=gen)
            w2 = lib.gptq_experts(e, inter, h, int(args.fmt[3:]), 128, gen=gen)
        for t in (int(v) for v in args.tokens.split(",")):
            best = sweep_one(fn, args.fmt, w13, w2, shape, t, unpacks, warps, args, gen)
            if args.write:
                table = json.loads(out.read_text()) if out.exists() else {}
                table.setdefault(shape_key(args.fmt, e, h, inter, top_k), {})[str(t)] = best.to_json()
                out.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
                print(f"  wrote {out.name}", flush=True)
        del w13, w2
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
