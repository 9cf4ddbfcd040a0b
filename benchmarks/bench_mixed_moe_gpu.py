"""A MoE layer whose experts come in two formats (10% FP8 block 128x128, 90% GPTQ int4 g128) against the
all-int4 layer: GPU time in a CUDA graph through the server's own entry (``serving.compute.moe_forward``,
one fused launch per format and projection), uniform routing. Target: mixed / all-int4 <= 1.15.

    PYTHONPATH=python python benchmarks/bench_mixed_moe_gpu.py [--shapes a,b] [--tokens 1,16,256,4096]
        [--fp8-share 0.1] [--out DIR]

Every timed layer is first checked against float64 (the script stops at a wrong or NaN result).
``--check`` runs only those checks on tiny shapes, on the CPU under the Triton interpreter:

    TRITON_INTERPRET=1 PYTHONPATH=python python benchmarks/bench_mixed_moe_gpu.py --check
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

import bench_moe_gpu  # noqa: E402
import moe_bench_lib as lib  # noqa: E402

from sglang.srt.enhanced.mixed_precision.kernels.packed_weights import GPTQExperts  # noqa: E402
from sglang.srt.enhanced.mixed_precision.serving.compute import (  # noqa: E402
    MixedExperts,
    moe_forward,
    moe_fused_kernels,
)

SHAPES = ("qwen3-30b-a3b", "deepseek-v3-tp8")
TOKENS = (1, 16, 256, 4096)
CHECK_SHAPE = (10, 2, 128, 128)  # --check: experts, top_k, hidden, intermediate
MAX_REL_ERR = 3e-2  # bf16 activations and intermediate, against float64
TARGET = 1.15


def take(w: GPTQExperts, experts: list[int]) -> GPTQExperts:
    idx = torch.tensor(experts, device=w.qweight.device)
    return GPTQExperts(w.qweight[idx].contiguous(), w.qzeros[idx].contiguous(), w.scales[idx].contiguous(), None,
                       w.bits, w.group_size, w.zero_offset)  # fmt: skip


def build_layers(e: int, h: int, inter: int, fp8_share: float, gen: torch.Generator):
    """``{"int4": (w13, w2, ref13, ref2), "mixed": ...}``: the layers' weights and what the float64 references read."""
    int4 = [lib.gptq_experts(e, h, 2 * inter, 4, 128, gen=gen), lib.gptq_experts(e, inter, h, 4, 128, gen=gen)]
    step = max(1, round(1 / fp8_share))
    fp8_ids = list(range(0, e, step))
    int4_ids = [i for i in range(e) if i not in fp8_ids]
    fp8 = [lib.fp8_experts(len(fp8_ids), h, 2 * inter, gen=gen), lib.fp8_experts(len(fp8_ids), inter, h, gen=gen)]
    mixed, refs = [], []
    for full, f in zip(int4, fp8, strict=True):
        sets = (take(full, int4_ids), f)
        mixed.append(MixedExperts.build(sets, (tuple(int4_ids), tuple(fp8_ids)), e, full.qweight.device))
        refs.append({g: (full, g) for g in int4_ids} | {g: (f, i) for i, g in enumerate(fp8_ids)})
    layers = {"int4": (*int4, *int4), "mixed": (*mixed, *refs)}
    return layers, len(fp8_ids)


def checked(name: str, fn, x, ref13, ref2, tw, ti, gen) -> float:  # noqa: ANN001
    err = lib.check(fn, x, ref13, ref2, tw, ti, gen)
    if not err <= MAX_REL_ERR:  # NaN too
        raise SystemExit(f"{name}: relative error {err:.3e} against float64 (limit {MAX_REL_ERR}): wrong result")
    return err


def run_check() -> None:
    """Tiny shapes on the CPU: the server's CPU loop and the fused kernels (interpreted), both layers."""
    from sglang.srt.enhanced.mixed_precision.kernels.fused_moe import _is_interpreted

    if not _is_interpreted():
        raise SystemExit("--check runs the kernels under the Triton interpreter: set TRITON_INTERPRET=1")
    lib.DEV = torch.device("cpu")
    gen = torch.Generator().manual_seed(0)
    e, top_k, h, inter = CHECK_SHAPE
    layers, n_fp8 = build_layers(e, h, inter, 0.25, gen)  # experts 0, 4, 8 in FP8
    print(f"mixed layer: {n_fp8} of {e} experts fp8")
    for t in (1, 5):
        x = (torch.randn(t, h, generator=gen) * 0.5).to(torch.bfloat16)
        tw, ti = lib.routing(t, e, top_k, 0.0, gen)
        if not (ti[0] == 0).any():
            ti[0, 0] = 0  # the first token uses an FP8 expert
        for name, (w13, w2, ref13, ref2) in layers.items():
            for path, fn in (("loop", moe_forward), ("kernels", moe_fused_kernels)):
                call = partial(fn, x, w13, w2, tw, ti, "silu")
                err = checked(f"{name} {path} T={t}", call, x, ref13, ref2, tw, ti, gen)
                print(f"{name:5s} {path:7s} T={t}: rel err {err:.2e}")
    print("check passed")


def bench(args, log) -> list[dict]:  # noqa: ANN001
    rows = []
    gen = torch.Generator(device=lib.DEV).manual_seed(0)
    for shape in args.shapes:
        e, top_k, h, inter = lib.SHAPES[shape]
        layers, n_fp8 = build_layers(e, h, inter, args.fp8_share, gen)
        for t in args.tokens:
            rot = bench_moe_gpu.ROTATE_SMALL if t <= 64 else bench_moe_gpu.ROTATE_LARGE
            inputs = []
            for _ in range(rot):
                x = (torch.randn(t, h, device=lib.DEV, generator=gen) * 0.5).to(torch.bfloat16)
                inputs.append((x, *lib.routing(t, e, top_k, 0.0, gen)))
            row = dict(shape=shape, tokens=t, fp8_experts=n_fp8, experts=e)
            for name, (w13, w2, ref13, ref2) in layers.items():
                calls = [partial(moe_forward, x, w13, w2, tw, ti, "silu") for x, tw, ti in inputs]
                x, tw, ti = inputs[0]
                # What the graph runs (the fused kernels at any batch inside a capture), compiled before capture.
                fused = partial(moe_fused_kernels, x, w13, w2, tw, ti, "silu")
                row[f"{name}_err"] = checked(f"{shape} {name} T={t}", fused, x, ref13, ref2, tw, ti, gen)
                for x, tw, ti in inputs[1:]:
                    moe_fused_kernels(x, w13, w2, tw, ti, "silu")
                row[f"{name}_us"] = lib.graph_time_us(calls)
            row["ratio"] = row["mixed_us"] / row["int4_us"]
            rows.append(row)
            log.write(json.dumps(row) + "\n")
            log.flush()
            print(f"{shape:16s} T={t:5d} int4 {row['int4_us']:9.1f} us  mixed {row['mixed_us']:9.1f} us  "
                  f"x{row['ratio']:.3f}", flush=True)  # fmt: skip
        del layers
        torch.cuda.empty_cache()
    return rows


def summary(rows: list[dict], fp8_share: float) -> str:
    out = [f"| shape | tokens | all int4 (us) | {fp8_share:.0%} fp8 + int4 (us) | ratio |", "|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['shape']} ({r['fp8_experts']}/{r['experts']} fp8) | {r['tokens']} | {r['int4_us']:.1f} | "
                   f"{r['mixed_us']:.1f} | {r['ratio']:.3f} |")  # fmt: skip
    worst = max(r["ratio"] for r in rows)
    errs = [r[k] for r in rows for k in ("int4_err", "mixed_err")]
    out.append(f"\nworst ratio {worst:.3f} (target <= {TARGET}: {'met' if worst <= TARGET else 'NOT met'}); "
               f"max rel err vs float64 {max(errs):.2e}")  # fmt: skip
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    ap.add_argument("--fp8-share", type=float, default=0.1)
    ap.add_argument("--check", action="store_true", help="tiny shapes on the CPU (TRITON_INTERPRET=1), no timing")
    ap.add_argument("--out", type=Path, default=Path("."))
    args = ap.parse_args()
    if args.check:
        run_check()
        return
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU (or --check with TRITON_INTERPRET=1 on the CPU)")
    args.shapes = args.shapes.split(",")
    args.tokens = [int(t) for t in args.tokens.split(",")]
    unknown = [s for s in args.shapes if s not in lib.SHAPES]
    if unknown:
        raise SystemExit(f"unknown shapes {unknown}; known: {sorted(lib.SHAPES)}")
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    card = lib.device_card(lib.copy_bandwidth())
    print(card, flush=True)
    with open(args.out / "bench_mixed_moe.jsonl", "w") as log:
        log.write(json.dumps({"card": card}) + "\n")
        rows = bench(args, log)
    text = card + "\n\n" + summary(rows, args.fp8_share) + f"\n({time.time() - t0:.0f} s)"
    (args.out / "bench_mixed_moe_summary.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
