"""Side-by-side GPU timing of GPTQ dequant kernel configs against GPTQModel, on a few shapes.

    PYTHONPATH=python python benchmarks/explore_dequant_gpu.py --gptqmodel-src .bench_deps [--out DIR]

For each shape every candidate config (BLOCK_N, BLOCK_K, num_warps, stream, variant) is first
checked against a float64 reference on fresh random inputs (NaN-poisoned output), then timed with
CUDA-graph replays over rotated input sets (``bench_dequant_gpu.graph_ms``), in several interleaved
rounds together with GPTQModel's kernel on the same inputs; the median over rounds is reported.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_dequant_gpu as B  # noqa: E402

from sglang.srt.enhanced.mixed_precision.kernels import gptq_dequant as gk  # noqa: E402
from sglang.srt.enhanced.mixed_precision.kernels.reference import gptq_dequant_ref  # noqa: E402

ROWSPLIT_TILES = [(64, 32, 4), (128, 32, 4), (256, 32, 4), (256, 32, 8), (512, 32, 8), (64, 64, 4), (128, 64, 4),
                  (128, 64, 8), (256, 64, 8), (32, 128, 4), (64, 128, 4), (128, 128, 8)]  # fmt: skip
ACT8 = [
    None,
    (128, 32, 4, False, 0),
    (128, 32, 4, False, 1),
    (64, 64, 4, False, 1),
    (64, 64, 4, False, 2),
    (128, 32, 4, False, 2),
]
ACT8 += [(*t, False, gk.ROWSPLIT) for t in ROWSPLIT_TILES]
ACT8 += [(*t, True, gk.ROWSPLIT) for t in ((128, 64, 4), (256, 32, 8))]
ACT_LOW = [None] + [(*t, False, v) for v in (gk.ROWSPLIT, gk.SPLIT) for t in ((128, 32, 4), (128, 64, 4),
                                                                                   (256, 32, 8))]  # fmt: skip
TINY = [None, (16, 64, 2, False, 0), (16, 64, 1, False, 0), (32, 64, 2, False, 0), (32, 64, 1, False, 0),
        (32, 32, 1, False, 0), (16, 128, 2, False, 0), (8, 128, 1, False, 0), (64, 64, 2, False, 0),
        (64, 32, 1, False, 0), (32, 128, 2, False, 0)]  # fmt: skip
SHAPES = [
    # label, in, out, bits, act-order, candidates, rounds
    ("Mixtral w1/w3 4096->14336 8-bit act-order", 4096, 14336, 8, True, ACT8, 3),
    ("Mixtral w2 14336->4096 8-bit act-order", 14336, 4096, 8, True, ACT8, 3),
    ("Mixtral w2 14336->4096 4-bit act-order", 14336, 4096, 4, True, ACT_LOW, 3),
    ("Mixtral w1/w3 4096->14336 2-bit act-order", 4096, 14336, 2, True, ACT_LOW, 3),
    ("Qwen3-30B-A3B attn k/v 2048->512", 2048, 512, 4, False, TINY, 5),
]


def explore(label, k, n, bits, act, candidates, rounds, gptqmodel, checks):
    torch.cuda.empty_cache()
    gen = torch.Generator(device=B.DEV).manual_seed(k + n + bits)
    first = B.random_gptq(0, k, n, bits, 128, act, gen)
    nbytes = B.gptq_bytes(*first, torch.empty(0)) + n * k * 2
    sets = [first] + [B.random_gptq(0, k, n, bits, 128, act, gen) for _ in range(B.n_sets(nbytes) - 1)]
    outs = [torch.empty((n, k), dtype=B.OUT_DTYPE, device=B.DEV) for _ in sets]
    kw = dict(bits=bits, group_size=128, zero_offset=0, out_dtype=B.OUT_DTYPE)
    check_in = B.random_gptq(0, k, n, bits, 128, act, gen)
    ref = gptq_dequant_ref(*check_in, bits=bits, group_size=128, zero_offset=0, out_dtype=torch.float64)
    good = []
    for c in candidates:
        out = torch.full((n, k), float("nan"), dtype=B.OUT_DTYPE, device=B.DEV)
        gk.gptq_dequant(*check_in, **kw, out=out, config=c)
        torch.cuda.synchronize()
        if B.check(f"{label} cfg={c}", out, ref, checks):
            good.append(c)
    del ref
    times: dict = {"gptqmodel": []}
    times.update({str(c): [] for c in good})
    for _ in range(rounds):
        if gptqmodel is not None:
            times["gptqmodel"].append(B.graph_ms([B.gptqmodel_call(gptqmodel, *t, bits, k) for t in sets]))
        for c in good:
            calls = [
                lambda t=t, o=o, c=c: gk.gptq_dequant(*t, **kw, out=o, config=c)
                for t, o in zip(sets, outs, strict=True)
            ]
            times[str(c)].append(B.graph_ms(calls))
    med = {name: statistics.median(ts) for name, ts in times.items() if ts}
    gm = med.get("gptqmodel")
    default = gk.pick_config(bits, 1, n, k, B.DEV, act)
    print(f"{label}: {nbytes / 1e6:.1f} MB, default config {default}, GPTQModel {gm}")
    for name, t in sorted(med.items(), key=lambda x: x[1]):
        spread = max(times[name]) - min(times[name])
        vs = f"x{gm / t:5.3f}" if gm else ""
        print(f"  {name:32s} {t * 1e3:8.2f} us  (spread {spread * 1e3:5.2f})  {vs}  "
              f"{nbytes / (t * 1e-3) / 1e9:6.0f} GB/s")  # fmt: skip
    return {"shape": label, "in": k, "out": n, "bits": bits, "act_order": act, "bytes": nbytes,
            "default": default, "times_ms": times, "median_ms": med}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--gptqmodel-src", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    props = torch.cuda.get_device_properties(0)
    print(json.dumps({"gpu": props.name, "torch": torch.__version__, "triton": triton.__version__}))
    gptqmodel, note = B.load_gptqmodel(args.gptqmodel_src)
    print("GPTQModel:", note)
    checks: list = []
    rows = [explore(*shape, gptqmodel, checks) for shape in SHAPES]
    ok = all(c["ok"] for c in checks)
    print(f"checks: {sum(c['ok'] for c in checks)}/{len(checks)} ok")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "explore.json").write_text(
            json.dumps({"rows": rows, "checks": checks}, indent=1, default=str)
        )
    if not ok:
        sys.exit("correctness checks FAILED")


if __name__ == "__main__":
    main()
