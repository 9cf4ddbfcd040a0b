"""Whole MoE layer on the GPU (CUDA-graph GPU time): SGLang 0.4.7's Triton kernels (bf16, int4) vs ours
(int4 g128 plain and act-order: as stored, gathering scales per value, and with its rows sorted by
group as the server loads it; int8, FP8 block) and the int4 floor; plus the dense packed linear vs
torch bf16 ``F.linear``. Every timed kernel is first checked against float64.

    PYTHONPATH=python python benchmarks/bench_moe_gpu.py --sglang-src DIR [--shapes a,b] [--tokens 1,16]
        [--routings uniform,zipf] [--variants ...] [--no-linear] [--out DIR]

``--sglang-src``: a folder holding SGLang 0.4.7's ``srt/layers/moe/fused_moe_triton/`` (its
``fused_moe.py`` and ``configs/``); the kernel functions are loaded from it alone, without its runtime.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))

import moe_bench_lib as lib  # noqa: E402

from sglang.srt.enhanced.mixed_precision.kernels.act_order import sort_act_order  # noqa: E402
from sglang.srt.enhanced.mixed_precision.kernels.fused_moe import fused_moe_fp8, fused_moe_gptq  # noqa: E402
from sglang.srt.enhanced.mixed_precision.kernels.moe_configs import pick_moe_config  # noqa: E402
from sglang.srt.enhanced.mixed_precision.kernels.packed_linear import gptq_linear, gptq_linear_ref  # noqa: E402

VARIANTS = ("int4", "bf16", "sglang_int4", "fp8_block", "int8", "int4_actorder", "int4_actorder_sorted")
ZIPF_VARIANTS = ("int4", "bf16", "sglang_int4")  # skewed routing: ours vs the two baselines
ZIPF = 1.2
LINEAR_SHAPES = {  # name: (in, out)
    "qwen3 q_proj 2048->4096": (2048, 4096),
    "qwen3 o_proj 4096->2048": (4096, 2048),
    "mixtral q/o 4096->4096": (4096, 4096),
    "deepseek-v3 dense gate_up 7168->36864/8": (7168, 4608),
    "llama-70b-like mlp 8192->28672": (8192, 28672),
}
# CUDA-graph calls per timing: rotating inputs so that a decode does not find its experts in L2.
ROTATE_SMALL, ROTATE_LARGE = 8, 2


def build(variant, e, h, inter, gen):
    if variant in ("int4", "sglang_int4", "bf16"):
        return lib.gptq_experts(e, h, 2 * inter, 4, 128, gen=gen), lib.gptq_experts(e, inter, h, 4, 128, gen=gen)
    if variant in ("int4_actorder", "int4_actorder_sorted"):
        ws = (lib.gptq_experts(e, h, 2 * inter, 4, 128, act_order=True, gen=gen),
              lib.gptq_experts(e, inter, h, 4, 128, act_order=True, gen=gen))
        return tuple(sort_act_order(w) for w in ws) if variant.endswith("sorted") else ws
    if variant == "int8":
        return lib.gptq_experts(e, h, 2 * inter, 8, 128, gen=gen), lib.gptq_experts(e, inter, h, 8, 128, gen=gen)
    return lib.fp8_experts(e, h, 2 * inter, gen=gen), lib.fp8_experts(e, inter, h, gen=gen)


def bench_moe(args, sg, bw, log) -> list[dict]:
    rows = []
    gen = torch.Generator(device=lib.DEV).manual_seed(0)
    for shape in args.shapes:
        e, top_k, h, inter = lib.SHAPES[shape]
        int4_bytes = None
        for variant in args.variants:
            w13, w2 = build(variant, e, h, inter, gen)
            if int4_bytes is None and variant in ("int4", "sglang_int4", "bf16"):
                int4_bytes = lib.expert_bytes(w13) + lib.expert_bytes(w2)
            ref13, ref2 = w13, w2
            if variant == "bf16":
                d13 = torch.stack([lib.expert_f64(w13, i).to(torch.bfloat16) for i in range(e)])
                d2 = torch.stack([lib.expert_f64(w2, i).to(torch.bfloat16) for i in range(e)])
                ref13, ref2 = d13, d2
                del w13, w2
            if variant == "sglang_int4":
                p13, sc13 = lib.wna16_layout(w13)
                p2, sc2 = lib.wna16_layout(w2)
            for routing in args.routings:
                if routing == "zipf" and variant not in args.zipf_variants:
                    continue
                for t in args.tokens:
                    rot = ROTATE_SMALL if t <= 64 else ROTATE_LARGE
                    sets = []
                    for _ in range(rot):
                        x = (torch.randn(t, h, device=lib.DEV, generator=gen) * 0.5).to(torch.bfloat16)
                        tw, ti = lib.routing(t, e, top_k, ZIPF if routing == "zipf" else 0.0, gen)
                        sets.append((x, tw, ti))
                    if variant == "bf16":
                        cfg = lib.sglang_config(sg, e, inter, t, None)
                        calls = [partial(lib.sglang_moe, sg, s[0], d13, d2, s[1], s[2], cfg) for s in sets]
                        how = "sglang " + ",".join(f"{k[:7]}={v}" for k, v in cfg.items())
                    elif variant == "sglang_int4":
                        cfg = lib.sglang_config(sg, e, inter, t, "int4_w4a16")
                        calls = [partial(lib.sglang_moe, sg, s[0], p13, p2, s[1], s[2], cfg, s1=sc13, s2=sc2)
                                 for s in sets]  # fmt: skip
                        how = "sglang " + ",".join(f"{k[:7]}={v}" for k, v in cfg.items())
                    else:
                        fn = fused_moe_fp8 if variant == "fp8_block" else fused_moe_gptq
                        calls = [partial(fn, s[0], w13, w2, s[1], s[2]) for s in sets]
                        fmt = "fp8_block" if variant == "fp8_block" else f"int{w13.bits}"
                        c = pick_moe_config(fmt, e, h, inter, top_k, t, lib.DEV)
                        how = f"{c.path} m{c.block_m} up{c.up.block_n}x{c.up.block_k} dn{c.down.block_n}x{c.down.block_k}s{c.down.split_k}"
                    x, tw, ti = sets[0]
                    err = lib.check(calls[0], x, ref13, ref2, tw, ti, gen)
                    us = lib.graph_time_us(calls)
                    distinct = sum(torch.unique(s[2]).numel() for s in sets) / rot
                    floor = distinct * int4_bytes / bw * 1e6 if int4_bytes else float("nan")
                    row = dict(shape=shape, variant=variant, routing=routing, tokens=t, us=us, rel_err=err,
                               floor_us=floor, distinct=distinct, config=how)  # fmt: skip
                    rows.append(row)
                    log.write(json.dumps(row) + "\n")
                    log.flush()
                    print(f"{shape:16s} {variant:14s} {routing:7s} T={t:5d} {us:9.1f} us err={err:.1e} "
                          f"floor={floor:7.1f} {how}", flush=True)  # fmt: skip
            torch.cuda.empty_cache()
    return rows


def bench_linear(args, bw, log) -> list[dict]:
    rows = []
    gen = torch.Generator(device=lib.DEV).manual_seed(1)
    for name, (k, n) in LINEAR_SHAPES.items():
        ws = [lib.gptq_experts(1, k, n, 4, 128, gen=gen) for _ in range(4)]
        ws = [type(w)(w.qweight[0], w.qzeros[0], w.scales[0], None, 4, 128, 1) for w in ws]
        dense = [lib.expert_f64(type(w)(w.qweight[None], w.qzeros[None], w.scales[None], None, 4, 128, 1), 0)
                 .to(torch.bfloat16) for w in ws]  # fmt: skip
        for t in args.tokens:
            xs = [(torch.randn(t, k, device=lib.DEV, generator=gen)).to(torch.bfloat16) for _ in ws]
            y = gptq_linear(xs[0], ws[0])
            ref = gptq_linear_ref(xs[0], ws[0])
            err = float((y.double() - ref).norm() / ref.norm()) if not torch.isnan(y).any() else float("nan")
            ours = lib.graph_time_us([lambda x=x, w=w: gptq_linear(x, w) for x, w in zip(xs, ws, strict=True)])
            cub = lib.graph_time_us([lambda x=x, d=d: F.linear(x, d) for x, d in zip(xs, dense, strict=True)])
            row = dict(linear=name, tokens=t, ours_us=ours, bf16_us=cub, rel_err=err)
            rows.append(row)
            log.write(json.dumps(row) + "\n")
            print(f"{name:42s} T={t:5d} int4 {ours:8.1f} us  bf16 {cub:8.1f} us  x{cub / ours:4.2f} err={err:.1e}",
                  flush=True)  # fmt: skip
        del ws, dense
        torch.cuda.empty_cache()
    return rows


def summary(rows, lrows) -> str:
    out = []
    for shape in dict.fromkeys(r["shape"] for r in rows):
        for routing in dict.fromkeys(r["routing"] for r in rows):
            sel = [r for r in rows if r["shape"] == shape and r["routing"] == routing]
            if not sel:
                continue
            toks = sorted({r["tokens"] for r in sel})
            out.append(f"\n{shape} / {routing} (us; floor = int4 bytes of distinct experts / copy rate)")
            out.append("| variant | " + " | ".join(str(t) for t in toks) + " |")
            out.append("|---|" + "---|" * len(toks))
            for v in dict.fromkeys(r["variant"] for r in sel):
                cell = {r["tokens"]: r for r in sel if r["variant"] == v}
                out.append(f"| {v} | " + " | ".join(f"{cell[t]['us']:.1f}" if t in cell else "" for t in toks) + " |")
            fl = {r["tokens"]: r["floor_us"] for r in sel if r["variant"] in ("int4", "sglang_int4", "bf16")}
            out.append("| int4 floor | " + " | ".join(f"{fl.get(t, float('nan')):.1f}" for t in toks) + " |")
    if lrows:
        out.append("\ndense linear (us): ours int4 g128 / torch bf16 F.linear")
        for name in dict.fromkeys(r["linear"] for r in lrows):
            sel = [r for r in lrows if r["linear"] == name]
            out.append(f"| {name} | " + " | ".join(f"T{r['tokens']}: {r['ours_us']:.1f}/{r['bf16_us']:.1f}"
                                                  for r in sel) + " |")  # fmt: skip
    errs = [r["rel_err"] for r in rows + lrows]
    out.append(f"\nmax rel err vs float64: {max(errs):.2e} over {len(errs)} checks; NaN: "
               f"{sum(e != e for e in errs)}")  # fmt: skip
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sglang-src", type=Path, required=True)
    ap.add_argument("--shapes", default=",".join(lib.SHAPES))
    ap.add_argument("--tokens", default=",".join(map(str, lib.TOKENS)))
    ap.add_argument("--routings", default="uniform,zipf")
    ap.add_argument("--zipf-variants", default=",".join(ZIPF_VARIANTS))
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--no-linear", action="store_true")
    ap.add_argument("--linear-only", action="store_true")
    ap.add_argument("--out", type=Path, default=Path("."))
    args = ap.parse_args()
    args.shapes = args.shapes.split(",")
    args.tokens = [int(t) for t in args.tokens.split(",")]
    args.routings = args.routings.split(",")
    args.variants = args.variants.split(",")
    args.zipf_variants = args.zipf_variants.split(",")
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    sg = lib.load_sglang(args.sglang_src)
    bw = lib.copy_bandwidth()
    card = lib.device_card(bw)
    print(card, flush=True)
    with open(args.out / "bench_moe.jsonl", "w") as log:
        log.write(json.dumps({"card": card}) + "\n")
        rows = [] if args.linear_only else bench_moe(args, sg, bw, log)
        lrows = [] if args.no_linear else bench_linear(args, bw, log)
    text = card + "\n" + summary(rows, lrows) + f"\n({time.time() - t0:.0f} s)"
    (args.out / "bench_moe_summary.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
