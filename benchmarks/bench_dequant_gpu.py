"""Dequantization kernels on a GPU: correctness against float64, then speed.

    PYTHONPATH=python python benchmarks/bench_dequant_gpu.py [--sweep] [--gptqmodel-src DIR] [--out DIR]

1. device-to-device copy bandwidth (bytes read + written), the ceiling for these kernels;
2. correctness: every kernel variant on fresh random inputs against a float64 reference,
   output poisoned with NaN first so unwritten elements show;
3. timing per shape:
   time, achieved bytes/s (packed bytes read + output written), fraction of the copy
   bandwidth, speed-up over a straightforward torch implementation and over GPTQModel's
   Triton dequant kernel on the same inputs. Times are GPU time per call from CUDA-graph
   replays over input sets rotated through more than 5x the L2 size (no host launch
   overhead); ``wall`` is ``do_bench`` on one input set, host launch overhead included.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import math
import sys
import tarfile
import types
from pathlib import Path

import torch
import triton
import triton.testing

from sglang.srt.enhanced.mixed_precision.kernels import fp8_dequant as fp8k
from sglang.srt.enhanced.mixed_precision.kernels import gptq_dequant as gk
from sglang.srt.enhanced.mixed_precision.kernels.reference import (
    fp8_block_dequant_ref,
    fp8_scaled_dequant_ref,
    gptq_dequant_ref,
)
from sglang.srt.enhanced.mixed_precision.packing import pack_int32

DEV = torch.device("cuda")
OUT_DTYPE = torch.bfloat16
GPTQ_SWEEP = [
    (32, 128, 4), (64, 128, 4), (128, 128, 4), (128, 128, 8), (256, 128, 8),
    (32, 256, 4), (64, 256, 4), (64, 256, 8), (128, 256, 8), (32, 512, 4),
]  # fmt: skip
SMALL_SWEEP = [
    (64, 128, 4),
    (32, 128, 4),
    (32, 64, 4),
    (16, 64, 2),
    (16, 128, 4),
    (32, 64, 2),
    (16, 64, 4),
    (8, 128, 2),
]
ACT_SWEEP = [(64, 64, 4), (128, 32, 4), (128, 64, 4), (64, 128, 4), (256, 32, 8), (128, 128, 8), (32, 128, 4),
             (64, 32, 4)]  # fmt: skip
FP8_SWEEP = [
    (32, 128, 4),
    (64, 128, 4),
    (128, 128, 8),
    (64, 256, 4),
    (32, 256, 4),
    (128, 256, 8),
    (16, 512, 4),
]


def bench_ms(fn) -> float:
    """Wall time per call as ``do_bench`` sees it (host launch overhead included when it dominates)."""
    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


ROTATE_BYTES = 256 * 2**20  # > 5x the 50 MB L2: each call finds its inputs and output cold


def graph_ms(calls) -> float:
    """GPU time per call: the calls (one per input set, rotating) captured in a CUDA graph.

    The graph holds enough rounds for about 2 ms of work; 7 replays are timed with events and
    the median divided by the number of calls. No host launch overhead is included.
    """
    for c in calls:
        c()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for c in calls:
        c()
    end.record()
    end.synchronize()
    rounds = max(1, min(200, int(2.0 / max(start.elapsed_time(end), 1e-3)) + 1))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(rounds):
            for c in calls:
                c()
    torch.cuda.synchronize()
    times = []
    for _ in range(7):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    del graph
    return sorted(times)[3] / (rounds * len(calls))


def n_sets(nbytes: int) -> int:
    return max(1, min(32, -(-ROTATE_BYTES // max(nbytes, 1))))


# ------------------------------------------------------------------------------------------------
# inputs and references


def random_gptq(e, k, n, bits=4, group_size=128, act_order=False, gen=None):
    """Random packed GPTQ tensors on the GPU ([E, ...] when e > 0, else 2-D)."""
    b = max(e, 1)
    groups = 1 if group_size == -1 else -(-k // group_size)
    q = torch.randint(0, 2**bits, (b, k, n), dtype=torch.int32, device=DEV, generator=gen)
    z = torch.randint(0, 2**bits, (b, groups, n), dtype=torch.int32, device=DEV, generator=gen)
    s = (torch.rand(b, groups, n, device=DEV, generator=gen) * 0.02 + 1e-3).to(torch.float16)
    if act_order:
        g = torch.stack([torch.randperm(k, device=DEV, generator=gen) % groups for _ in range(b)]).to(
            torch.int32
        )
    else:
        g = None
    qw, qz = pack_int32(q, bits, 1), pack_int32(z, bits, 2)
    if e == 0:
        return qw[0], qz[0], s[0], None if g is None else g[0]
    return qw, qz, s, g


def random_fp8(m, n, gen):
    """Random e4m3 values over its whole range (clamped: out-of-range casts give NaN)."""
    x = torch.randn(m, n, device=DEV, generator=gen) * 100
    return x.clamp(-448, 448).to(torch.float8_e4m3fn)


def torch_gptq(qweight, qzeros, scales, g_idx, bits, group_size, zero_offset):
    """Straightforward torch dequant (shift/mask unpack, index scales, multiply, transpose)."""
    shifts = torch.arange(0, 32, bits, device=qweight.device, dtype=torch.int32)
    mask = (1 << bits) - 1
    q = (qweight.unsqueeze(-2) >> shifts[:, None]) & mask  # [..., R, V, N]
    q = q.reshape(*qweight.shape[:-2], -1, qweight.shape[-1])  # [..., K, N]
    z = (qzeros.unsqueeze(-1) >> shifts) & mask
    z = z.reshape(*qzeros.shape[:-1], -1) + zero_offset  # [..., G, N]
    k = q.shape[-2]
    g = g_idx.long() if g_idx is not None else torch.arange(k, device=q.device) // group_size
    w = (q - z[..., g, :]).to(scales.dtype) * scales[..., g, :]
    return w.transpose(-1, -2).contiguous()


def gptq_bytes(qw, qz, s, g, out) -> int:
    return sum(t.numel() * t.element_size() for t in (qw, qz, s, out) + ((g,) if g is not None else ()))


# ------------------------------------------------------------------------------------------------
# GPTQModel's kernel


def load_gptqmodel(src: Path | None):
    """GPTQModel's ``dequant`` launcher, or ``(None, why)``."""
    if src is None:
        return None, "no GPTQModel source given"
    sdists = sorted(src.glob("gptqmodel-*.tar.gz"))
    if not sdists:
        return None, f"no gptqmodel sdist in {src}"
    root = Path("/tmp/gptqmodel_src")
    with tarfile.open(sdists[-1]) as tar:
        tar.extractall(root, filter="data")
    pkg_root = next(root.glob("gptqmodel-*"))
    version = pkg_root.name.split("-", 1)[1]
    sys.path.insert(0, str(pkg_root))
    try:
        from gptqmodel.nn_modules.triton_utils.dequant import dequant  # type: ignore

        return dequant, f"gptqmodel {version}, package import"
    except Exception as e:  # the package __init__ pulls in many optional dependencies
        why = f"{type(e).__name__}: {str(e)[:120]}"
    finally:
        sys.path.pop(0)
    for name in [m for m in sys.modules if m == "gptqmodel" or m.startswith("gptqmodel.")]:
        del sys.modules[name]
    # Load the kernel file itself; its only package dependency is utils.torch.HAS_XPU.
    for name in ("gptqmodel", "gptqmodel.nn_modules", "gptqmodel.nn_modules.triton_utils", "gptqmodel.utils"):
        mod = types.ModuleType(name)
        mod.__path__ = []
        sys.modules[name] = mod
    shim = types.ModuleType("gptqmodel.utils.torch")
    shim.HAS_XPU = False
    sys.modules["gptqmodel.utils.torch"] = shim
    path = pkg_root / "gptqmodel/nn_modules/triton_utils/dequant.py"
    spec = importlib.util.spec_from_file_location("gptqmodel.nn_modules.triton_utils.dequant", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.dequant, f"gptqmodel {version}: kernel file loaded alone (package import failed: {why})"


def gptqmodel_call(dequant, qw, qz, s, g, bits, k):
    """GPTQModel dequant ([in, out], zeros in v2 form, g_idx required) on one matrix."""
    if g is None:
        g = torch.arange(k, device=DEV, dtype=torch.int32) // (k // s.shape[0])
    return lambda: dequant(OUT_DTYPE, qw, s, qz, g, bits, 32, (1 << bits) - 1)


# ------------------------------------------------------------------------------------------------
# checks


def check(name, out, ref64, results, poisoned=True):
    finite = bool(torch.isfinite(out).all())
    diff = (out.double() - ref64).abs()
    bound = ref64.abs() * 2.0**-8 + 1e-6  # half an ulp of bfloat16 plus slack
    within = bool((diff <= bound).all()) if finite else False
    rel = float(torch.linalg.vector_norm(out.double() - ref64) / torch.linalg.vector_norm(ref64))
    ok = finite and within and rel < 5e-3
    results.append(
        {"check": name, "ok": ok, "all_written": finite, "rel_err": rel, "max_abs": float(diff.max())}
    )
    print(
        f"  {'ok ' if ok else 'BAD'} {name}: rel {rel:.2e} max|d| {float(diff.max()):.2e} all written {finite}"
    )
    return ok


def run_checks(gptqmodel, results) -> bool:
    print("correctness (fresh random inputs, NaN-poisoned outputs, float64 reference)")
    ok = True
    gen = torch.Generator(device=DEV).manual_seed(1234)
    cases = [
        (4, 2048, 768, 128, False, 1, None), (4, 768, 2048, 128, False, 0, None), (4, 4096, 1408, 128, True, 1, None),
        (4, 1408, 2048, 128, False, 1, (32, 256, 4)), (4, 2048, 512, -1, False, 0, None),
        (4, 4096, 1024, 32, False, 1, (64, 256, 8)), (2, 2048, 768, 64, True, 0, None),
        (3, 2048, 768, 128, False, 1, None), (3, 1024, 512, 128, True, 0, None), (8, 2048, 768, 128, False, 1, None),
        (8, 768, 2048, -1, True, 0, None), (4, 4096, 1408, 128, True, 1, (64, 128, 4, False, 0)),
        (4, 4096, 1408, 64, True, 0, (32, 64, 4, True, 1)), (4, 4096, 1408, 128, True, 1, (128, 32, 4, False, 2)),
        (3, 4096, 1408, 128, True, 1, (64, 64, 4, False, 2)), (4, 2048, 768, 128, False, 0, (64, 64, 4, True, 2)),
        (8, 4096, 1400, 128, True, 1, (128, 32, 4, False, 3)), (8, 1000, 1408, 128, True, 0, (64, 64, 4, True, 3)),
        (2, 4096, 1408, 64, True, 0, (256, 32, 8, False, 3)), (4, 2048, 760, 128, False, 1, (128, 64, 4, False, 3)),
    ]  # fmt: skip
    configs = [
        None,
        *GPTQ_SWEEP,
        *SMALL_SWEEP,
        (64, 128, 4, True, 1),
        (128, 128, 8, True, 0),
        (64, 64, 4, True, 2),
    ]
    for bits, k, n, gs, act, zoff, cfg in cases:
        qw, qz, s, g = random_gptq(3, k, n, bits, gs, act, gen)
        ref = gptq_dequant_ref(
            qw, qz, s, g, bits=bits, group_size=gs, zero_offset=zoff, out_dtype=torch.float64
        )
        for c in configs if (bits == 4 and k == 2048 and n == 768) else [cfg]:
            out = torch.full((3, n, k), float("nan"), dtype=OUT_DTYPE, device=DEV)
            gk.gptq_dequant_batched(qw, qz, s, g, bits=bits, group_size=gs, zero_offset=zoff, out_dtype=OUT_DTYPE,
                                    out=out, config=c)  # fmt: skip
            torch.cuda.synchronize()
            ok &= check(
                f"gptq bits={bits} k={k} n={n} gs={gs} act={act} v{2 - zoff} cfg={c}", out, ref, results
            )
        out1 = gk.gptq_dequant(qw[1], qz[1], s[1], None if g is None else g[1], bits=bits, group_size=gs,
                               zero_offset=zoff, out_dtype=OUT_DTYPE, config=cfg)  # fmt: skip
        ok &= check(f"gptq single bits={bits} k={k} n={n}", out1, ref[1], results)
    if gptqmodel is not None:
        qw, qz, s, g = random_gptq(0, 2048, 768, 4, 128, True, gen)
        ref = gptq_dequant_ref(qw, qz, s, g, bits=4, group_size=128, zero_offset=0, out_dtype=torch.float64)
        theirs = gptqmodel_call(gptqmodel, qw, qz, s, g, 4, 2048)()
        ok &= check("GPTQModel dequant (transposed) vs float64", theirs.t(), ref, results)
    for m, n, block, cfg in [(4096, 2048, (128, 128), None), (1000, 1500, (128, 128), None),
                             (777, 333, (64, 32), (32, 128, 4)), (14336, 4096, (128, 128), (128, 256, 8))]:  # fmt: skip
        w = random_fp8(m, n, gen)
        si = torch.rand(-(-m // block[0]), -(-n // block[1]), device=DEV, generator=gen) + 1e-3
        ref = fp8_block_dequant_ref(w, si, block, torch.float64)
        ok &= check(f"fp8 block {m}x{n} {block} cfg={cfg}", fp8k.fp8_block_dequant(w, si, block, OUT_DTYPE, config=cfg),
                    ref, results)  # fmt: skip
        for sc in (torch.rand((), device=DEV) + 0.01, torch.rand(m, 1, device=DEV) + 0.01):
            ref = fp8_scaled_dequant_ref(w, sc, torch.float64)
            ok &= check(f"fp8 scaled {m}x{n} scale {tuple(sc.shape)}", fp8k.fp8_scaled_dequant(w, sc, OUT_DTYPE), ref,
                        results)  # fmt: skip
    return ok


# ------------------------------------------------------------------------------------------------
# timing


def copy_bandwidth() -> float:
    x = torch.empty(2**30, dtype=torch.uint8, device=DEV).random_()
    y = torch.empty_like(x)
    ms = bench_ms(lambda: y.copy_(x))
    return 2 * 2**30 / (ms * 1e-3)


GPTQ_SHAPES = [
    # label, experts stacked (0 = one 2-D matrix), in, out, act-order
    ("Qwen3-30B-A3B expert gate/up 2048->768", 0, 2048, 768, False),
    ("Qwen3-30B-A3B expert down 768->2048", 0, 768, 2048, False),
    ("Qwen3-30B-A3B attn q 2048->4096", 0, 2048, 4096, False),
    ("Qwen3-30B-A3B attn o 4096->2048", 0, 4096, 2048, False),
    ("Qwen3-30B-A3B attn k/v 2048->512", 0, 2048, 512, False),
    ("Mixtral-8x7B expert w1/w3 4096->14336", 0, 4096, 14336, False),
    ("Mixtral-8x7B expert w2 14336->4096", 0, 14336, 4096, False),
    ("Mixtral-8x7B expert w2 act-order", 0, 14336, 4096, True),
    ("DeepSeek-V2-Lite expert 2048->1408", 0, 2048, 1408, False),
    ("DeepSeek-V2-Lite expert 1408->2048", 0, 1408, 2048, False),
    ("Qwen3-30B-A3B 256 gate+up stacked", 256, 2048, 768, False),
    ("Qwen3-30B-A3B 128 down stacked", 128, 768, 2048, False),
]


def time_gptq(label, e, k, n, act, copy_bw, gptqmodel, sweep, rows, checks, bits=4):
    torch.cuda.empty_cache()
    gen = torch.Generator(device=DEV).manual_seed(e * 7 + k + n + bits)
    shape = (e, n, k) if e else (n, k)
    first = random_gptq(e, k, n, bits, 128, act, gen)
    nbytes = gptq_bytes(*first, torch.empty(0)) + math.prod(shape) * 2
    sets = [first] + [random_gptq(e, k, n, bits, 128, act, gen) for _ in range(n_sets(nbytes) - 1)]
    outs = [torch.empty(shape, dtype=OUT_DTYPE, device=DEV) for _ in sets]
    fn = gk.gptq_dequant_batched if e else gk.gptq_dequant
    kw = dict(bits=bits, group_size=128, zero_offset=0, out_dtype=OUT_DTYPE)

    def ours(cfg=None):
        return [lambda t=t, o=o: fn(*t, **kw, out=o, config=cfg) for t, o in zip(sets, outs, strict=True)]

    ms = graph_ms(ours())
    ms_wall = bench_ms(ours()[0])
    best_cfg, best = None, ms
    big = e > 0 or k * n >= 8 * 2**20
    candidates = []
    if sweep and act:
        candidates = [(*cfg, False, v) for cfg in ACT_SWEEP for v in (3, 2, 0, 1)]
    elif sweep and bits == 4:
        for cfg in GPTQ_SWEEP if big else SMALL_SWEEP:
            for stream in (False, True) if big else (False,):
                candidates.append((*cfg, stream, 0))
    swept = []
    for c in candidates:
        t = graph_ms(ours(c))
        swept.append((t, c))
        if t < best:
            best_cfg, best = c, t
    if candidates:
        again = graph_ms(ours())
        print(
            f"    default config {gk.pick_config(bits, max(e, 1), n, k, DEV, act)}: {ms:.4f} ms, again after "
            f"the sweep {again:.4f} ms; fastest: " + ", ".join(f"{c} {t:.4f}" for t, c in sorted(swept)[:6])
        )
        if not big:
            print("    all: " + ", ".join(f"{c[:3]} {t:.4f}" for t, c in swept))
    if bits == 3:  # shift/mask unpacking needs whole values per word; the reference handles 3 bits
        ms_torch = graph_ms([lambda t=t: gptq_dequant_ref(*t, bits=3, group_size=128, zero_offset=0,
                                                          out_dtype=OUT_DTYPE) for t in sets])  # fmt: skip
    else:
        ms_torch = graph_ms([lambda t=t: torch_gptq(*t, bits, 128, 0) for t in sets])
    ms_gm = None
    if gptqmodel is not None:
        if e:
            calls = [[gptqmodel_call(gptqmodel, qw[i], qz[i], s[i], None if g is None else g[i], bits, k)
                      for i in range(e)] for qw, qz, s, g in sets]  # fmt: skip
            ms_gm = graph_ms([lambda cs=cs: [c() for c in cs] for cs in calls])
        else:
            ms_gm = graph_ms([gptqmodel_call(gptqmodel, *t, bits, k) for t in sets])
    out = outs[0].fill_(float("nan"))
    fn(*sets[0], **kw, out=out)
    ref = gptq_dequant_ref(*sets[0], bits=bits, group_size=128, zero_offset=0, out_dtype=torch.float64)
    ok = check(f"timed default config: {label}", out, ref, checks)
    del ref
    row = {
        "shape": label, "bits": bits, "checked": ok, "experts": e, "in": k, "out": n, "act_order": act, "bytes": nbytes,
        "ms": ms, "ms_wall_do_bench": ms_wall, "ms_best_swept": best, "best_config": best_cfg,
        "GBps": nbytes / (ms * 1e-3) / 1e9, "frac_copy": nbytes / (ms * 1e-3) / copy_bw, "ms_torch": ms_torch,
        "speedup_torch": ms_torch / ms, "ms_gptqmodel": ms_gm, "speedup_gptqmodel": (ms_gm / ms) if ms_gm else None,
    }  # fmt: skip
    rows.append(row)
    gm = f"{ms_gm:8.4f} ms x{ms_gm / ms:5.2f}" if ms_gm else "n/a"
    print(f"  {label:44s} {ms:8.4f} ms {row['GBps']:6.0f} GB/s {row['frac_copy']:5.2f} of copy | torch x"
          f"{row['speedup_torch']:5.1f} | GPTQModel {gm} | wall {ms_wall:.4f} | swept best {best:.4f} "
          f"{best_cfg}")  # fmt: skip


def time_layer(copy_bw, gptqmodel, rows):
    """All 128 experts x 3 matrices of one Qwen3-30B-A3B layer: gate+up stacked, then down."""
    gen = torch.Generator(device=DEV).manual_seed(99)
    gu = random_gptq(256, 2048, 768, 4, 128, False, gen)
    dn = random_gptq(128, 768, 2048, 4, 128, False, gen)
    out_gu = torch.empty(256, 768, 2048, dtype=OUT_DTYPE, device=DEV)
    out_dn = torch.empty(128, 2048, 768, dtype=OUT_DTYPE, device=DEV)
    kw = dict(bits=4, group_size=128, zero_offset=0, out_dtype=OUT_DTYPE)

    def ours():
        gk.gptq_dequant_batched(*gu, **kw, out=out_gu)
        gk.gptq_dequant_batched(*dn, **kw, out=out_dn)

    ms = graph_ms([ours])
    ms_wall = bench_ms(ours)
    ms_torch = graph_ms([lambda: (torch_gptq(*gu, 4, 128, 0), torch_gptq(*dn, 4, 128, 0))])
    ms_gm = None
    if gptqmodel is not None:
        calls = [gptqmodel_call(gptqmodel, t[0][i], t[1][i], t[2][i], None, 4, k)
                 for t, k, e in ((gu, 2048, 256), (dn, 768, 128)) for i in range(e)]  # fmt: skip
        ms_gm = graph_ms([lambda: [c() for c in calls]])
    nbytes = gptq_bytes(*gu, out_gu) + gptq_bytes(*dn, out_dn)
    row = {
        "shape": "Qwen3-30B-A3B layer: 128 experts x 3 (2 launches)", "experts": 384, "bytes": nbytes, "ms": ms,
        "ms_wall_do_bench": ms_wall, "best_config": None, "GBps": nbytes / (ms * 1e-3) / 1e9,
        "frac_copy": nbytes / (ms * 1e-3) / copy_bw, "ms_torch": ms_torch, "speedup_torch": ms_torch / ms,
        "ms_gptqmodel": ms_gm, "speedup_gptqmodel": (ms_gm / ms) if ms_gm else None,
    }  # fmt: skip
    rows.append(row)
    gm = f"{ms_gm:8.4f} ms x{ms_gm / ms:5.2f}" if ms_gm else "n/a"
    print(f"  {row['shape']:44s} {ms:8.4f} ms {row['GBps']:6.0f} GB/s {row['frac_copy']:5.2f} of copy | "
          f"torch x{row['speedup_torch']:5.1f} | GPTQModel {gm} | wall {ms_wall:.4f}")  # fmt: skip


FP8_SHAPES = [(14336, 4096), (4096, 14336), (4096, 2048), (768, 2048)]


def time_fp8_one(label, make_call, ref_call, sets, nbytes, copy_bw, sweep, rows):
    ms = graph_ms([make_call(t, None) for t in sets])
    ms_wall = bench_ms(make_call(sets[0], None))
    best_cfg, best = None, ms
    for cfg in FP8_SWEEP if sweep else []:
        t = graph_ms([make_call(x, cfg) for x in sets])
        if t < best:
            best_cfg, best = cfg, t
    ms_torch = graph_ms([ref_call(t) for t in sets])
    row = {
        "shape": label, "bytes": nbytes, "ms": ms, "ms_wall_do_bench": ms_wall, "ms_best_swept": best,
        "best_config": best_cfg, "GBps": nbytes / (ms * 1e-3) / 1e9, "frac_copy": nbytes / (ms * 1e-3) / copy_bw,
        "ms_torch": ms_torch, "speedup_torch": ms_torch / ms,
    }  # fmt: skip
    rows.append(row)
    print(f"  {label:44s} {ms:8.4f} ms {row['GBps']:6.0f} GB/s {row['frac_copy']:5.2f} of copy | "
          f"torch x{row['speedup_torch']:5.1f} | wall {ms_wall:.4f} | swept best {best:.4f} {best_cfg}")  # fmt: skip


def time_fp8(copy_bw, sweep, rows):
    gen = torch.Generator(device=DEV).manual_seed(5)
    for m, n in FP8_SHAPES:
        nbytes = m * n * 3
        sets = []
        for _ in range(n_sets(nbytes)):
            w = random_fp8(m, n, gen)
            si = torch.rand(-(-m // 128), -(-n // 128), device=DEV, generator=gen) + 1e-3
            sc = torch.rand(m, 1, device=DEV, generator=gen) + 1e-3
            sets.append((w, si, sc))
        time_fp8_one(
            f"fp8 block {m}x{n}",
            lambda t, c: lambda: fp8k.fp8_block_dequant(t[0], t[1], (128, 128), OUT_DTYPE, config=c),
            lambda t: lambda: fp8_block_dequant_ref(t[0], t[1], (128, 128), OUT_DTYPE),
            sets, nbytes + sets[0][1].numel() * 4, copy_bw, sweep, rows,
        )  # fmt: skip
        time_fp8_one(
            f"fp8 channel {m}x{n}",
            lambda t, c: lambda: fp8k.fp8_scaled_dequant(t[0], t[2], OUT_DTYPE, config=c),
            lambda t: lambda: fp8_scaled_dequant_ref(t[0], t[2], OUT_DTYPE),
            sets, nbytes + m * 4, copy_bw, sweep, rows,
        )  # fmt: skip
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sweep", action="store_true", help="also time a sweep of tile configs per shape")
    parser.add_argument("--gptqmodel-src", type=Path, default=None, help="folder with a gptqmodel sdist")
    parser.add_argument("--out", type=Path, default=None, help="write results.json here")
    parser.add_argument("--skip-checks", action="store_true")
    parser.add_argument("--focus", action="store_true", help="only the 8-bit act-order and k/v sweeps")
    parser.add_argument("--layer-repeats", type=int, default=0,
                        help="only time the whole Qwen3-30B-A3B layer, this many times (with GPTQModel once)")
    args = parser.parse_args()
    props = torch.cuda.get_device_properties(0)
    env = {
        "date": datetime.date.today().isoformat(), "gpu": props.name, "sms": props.multi_processor_count,
        "torch": torch.__version__, "triton": triton.__version__, "command": " ".join(sys.argv),
    }  # fmt: skip
    print(json.dumps(env))
    gptqmodel, gm_note = load_gptqmodel(args.gptqmodel_src)
    print("GPTQModel:", gm_note)
    results: dict = {"env": env, "gptqmodel": gm_note, "checks": [], "rows": []}
    if not args.skip_checks:
        results["checks_ok"] = run_checks(gptqmodel, results["checks"])
    copy_bw = copy_bandwidth()
    results["copy_GBps"] = copy_bw / 1e9
    print(f"device-to-device copy: {copy_bw / 1e9:.0f} GB/s (read + write)")
    if args.layer_repeats:
        for i in range(args.layer_repeats):
            time_layer(copy_bw, gptqmodel if i == 0 else None, results["rows"])
        times = sorted(r["ms"] for r in results["rows"])
        print(f"layer GPU time over {len(times)} measurements: min {times[0]:.4f} median "
              f"{times[len(times) // 2]:.4f} max {times[-1]:.4f} ms")
        return
    if args.focus:
        for label, e, k, n, act, bits in (
            ("Mixtral w1/w3 4096->14336 8-bit act-order", 0, 4096, 14336, True, 8),
            ("Mixtral w2 14336->4096 8-bit act-order", 0, 14336, 4096, True, 8),
            ("Qwen3-30B-A3B attn k/v 2048->512", 0, 2048, 512, False, 4),
        ):
            time_gptq(
                label, e, k, n, act, copy_bw, gptqmodel, True, results["rows"], results["checks"], bits=bits
            )
        print("all checks ok:", all(c["ok"] for c in results["checks"]))
        return
    print("GPTQ 4-bit, group 128, bf16 out:")
    for label, e, k, n, act in GPTQ_SHAPES:
        time_gptq(label, e, k, n, act, copy_bw, gptqmodel, args.sweep, results["rows"], results["checks"])
    time_layer(copy_bw, gptqmodel, results["rows"])
    print("GPTQ other bit widths, group 128, bf16 out (default configs):")
    for bits in (2, 3, 8):
        for act in (False, True):
            label = f"Mixtral w1/w3 4096->14336 {bits}-bit" + (" act-order" if act else "")
            time_gptq(
                label,
                0,
                4096,
                14336,
                act,
                copy_bw,
                gptqmodel,
                False,
                results["rows"],
                results["checks"],
                bits=bits,
            )
    print("FP8 (e4m3) -> bf16:")
    time_fp8(copy_bw, args.sweep, results["rows"])
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    results["all_checks_ok"] = all(c["ok"] for c in results["checks"])
    print("all checks ok:", results["all_checks_ok"])
    if not results["all_checks_ok"]:
        sys.exit("correctness checks FAILED")


if __name__ == "__main__":
    main()
