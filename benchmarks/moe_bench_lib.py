"""Shared pieces of the MoE GPU benchmark and tuner: SGLang 0.4.7's own Triton MoE kernels loaded
standalone from its ``fused_moe.py``, packed expert builders on the GPU, float64 checks and
CUDA-graph timing with inputs rotated past the L2 cache."""

from __future__ import annotations

import ast
import importlib.util
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from sglang.srt.enhanced.mixed_precision.kernels.act_order import unsort_rows
from sglang.srt.enhanced.mixed_precision.kernels.packed_weights import FP8Experts, GPTQExperts
from sglang.srt.enhanced.mixed_precision.kernels.reference import fp8_block_dequant_ref, gptq_dequant_ref
from sglang.srt.enhanced.mixed_precision.packing import pack_int32, unpack_int32

DEV = torch.device("cuda")
SHAPES = {  # name: (experts, top_k, hidden, intermediate)
    "qwen3-30b-a3b": (128, 8, 2048, 768),
    "deepseek-v3-tp8": (256, 8, 7168, 256),
    "mixtral-8x7b": (8, 2, 4096, 14336),
}
TOKENS = (1, 4, 16, 64, 256, 1024, 4096)
SGLANG_KERNELS = (
    "write_zeros_to_output", "fused_moe_kernel_gptq_awq", "fused_moe_kernel", "ceil_div",
    "moe_align_block_size_stage1", "moe_align_block_size_stage2", "moe_align_block_size_stage3",
    "moe_align_block_size_stage4", "moe_align_block_size_triton", "init_sorted_ids_and_cumsum_buffer_kernel",
    "init_sorted_ids_and_cumsum_buffer", "_moe_sum_reduce_kernel", "moe_sum_reduce_triton",
)  # fmt: skip


# ---------------------------------------------------------------- SGLang 0.4.7 kernels, standalone
def load_sglang(src: Path):
    """The kernel functions of SGLang's ``fused_moe.py`` (found under ``src``), without its runtime imports."""
    path = next(src.rglob("layers/moe/fused_moe_triton/fused_moe.py"))
    tree = ast.parse(path.read_text())
    keep = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in SGLANG_KERNELS]
    header = "import torch\nimport triton\nimport triton.language as tl\n\nnext_power_of_2 = triton.next_power_of_2\n\n"
    out = Path("/tmp/sglang047_moe_kernels.py")
    out.write_text(header + "\n\n".join(ast.unparse(n) for n in keep) + "\n")
    spec = importlib.util.spec_from_file_location("sglang047_moe_kernels", out)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.CONFIG_DIR = path.parent / "configs"
    return mod


def sglang_config(mod, e: int, inter: int, tokens: int, dtype: str | None) -> dict:
    """SGLang's own choice: its tuned H200 JSON for this (E, N, dtype) if shipped, else its default."""
    name = f"E={e},N={inter},device_name={torch.cuda.get_device_name().replace(' ', '_')}"
    name += f",dtype={dtype}.json" if dtype else ".json"
    for d in ("triton_3_3_1", "triton_3_2_0", "triton_3_1_0"):
        p = mod.CONFIG_DIR / d / name
        if p.exists():
            table = {int(k): v for k, v in json.loads(p.read_text()).items()}
            return dict(table[min(table, key=lambda m: abs(m - tokens))])
    if tokens <= e:
        return {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 32, "BLOCK_SIZE_K": 64, "GROUP_SIZE_M": 1}
    return {"BLOCK_SIZE_M": 64, "BLOCK_SIZE_N": 64, "BLOCK_SIZE_K": 32, "GROUP_SIZE_M": 8}


def sglang_align(mod, topk_ids, block_m, e):
    max_padded = topk_ids.numel() + e * (block_m - 1)
    sorted_ids, _ = mod.init_sorted_ids_and_cumsum_buffer(max_padded, topk_ids.numel(), e, topk_ids.device)
    expert_ids = torch.empty((triton.cdiv(max_padded, block_m),), dtype=torch.int32, device=topk_ids.device)
    num_post = torch.empty((1,), dtype=torch.int32, device=topk_ids.device)
    mod.moe_align_block_size_triton(topk_ids, e, block_m, sorted_ids, expert_ids, num_post)
    return sorted_ids, expert_ids, num_post


def _sglang_gemm(mod, a, b, c, scale, tw, ti, align, mul_w, top_k, cfg, int4, group):
    sorted_ids, expert_ids, num_post = align
    cfg = dict(cfg)
    grid = (triton.cdiv(sorted_ids.shape[0], cfg["BLOCK_SIZE_M"]) * triton.cdiv(b.shape[1], cfg["BLOCK_SIZE_N"]),)
    k = a.shape[1]
    even = k % cfg["BLOCK_SIZE_K"] == 0
    if int4:
        mod.fused_moe_kernel_gptq_awq[grid](
            a, b, c, scale, None, tw, sorted_ids, expert_ids, num_post,
            b.shape[1], k, sorted_ids.shape[0], ti.numel(),
            a.stride(0), a.stride(1), b.stride(0), b.stride(2), b.stride(1), c.stride(1), c.stride(2),
            scale.stride(0), scale.stride(2), scale.stride(1), 0, 0, 0,
            group_size=group, MUL_ROUTED_WEIGHT=mul_w, top_k=top_k, compute_type=tl.bfloat16, has_zp=False,
            use_int4_w4a16=True, use_int8_w8a16=False, even_Ks=even, **cfg,
        )  # fmt: skip
    else:
        mod.fused_moe_kernel[grid](
            a, b, c, None, None, tw, sorted_ids, expert_ids, num_post,
            b.shape[1], k, sorted_ids.shape[0], ti.numel(),
            a.stride(0), a.stride(1), b.stride(0), b.stride(2), b.stride(1), c.stride(1), c.stride(2),
            0, 0, 0, 0, 0, 0, 0, MUL_ROUTED_WEIGHT=mul_w, top_k=top_k, compute_type=tl.bfloat16,
            use_fp8_w8a8=False, use_int8_w8a8=False, use_int8_w8a16=False, per_channel_quant=False,
            even_Ks=even, **cfg,
        )  # fmt: skip


def sglang_moe(mod, x, w1, w2, tw, ti, cfg, *, s1=None, s2=None, group=128):
    """SGLang 0.4.7's fused_experts pipeline (bf16 or moe_wna16 int4): align, gate/up GEMM, SiLU x up
    (torch; SGLang calls sgl-kernel's silu_and_mul), down GEMM with routing weights, top-k sum."""
    t, top_k = ti.shape
    n = w1.shape[1]
    int4 = s1 is not None
    align = sglang_align(mod, ti, cfg["BLOCK_SIZE_M"], w1.shape[0])
    c1 = torch.empty((t, top_k, n), dtype=x.dtype, device=x.device)
    _sglang_gemm(mod, x, w1, c1, s1, tw, ti, align, False, top_k, cfg, int4, group)
    g, u = c1.view(-1, n).chunk(2, dim=-1)
    c2 = F.silu(g) * u
    c3 = torch.empty((t, top_k, w2.shape[1]), dtype=x.dtype, device=x.device)
    _sglang_gemm(mod, c2, w2, c3, s2, tw, ti, align, True, 1, cfg, int4, group)
    out = torch.empty((t, w2.shape[1]), dtype=x.dtype, device=x.device)
    if top_k == 2:
        torch.add(c3[:, 0], c3[:, 1], out=out)
    else:
        mod.moe_sum_reduce_triton(c3, out, 1.0)
    return out


def wna16_layout(w: GPTQExperts) -> tuple[torch.Tensor, torch.Tensor]:
    """moe_wna16's int4 layout of a sym GPTQ weight: uint8 ``[E, N, K/2]`` (low nibble = even k), scales ``[E, N, G]``."""
    q = unpack_int32(w.qweight, 4, dim=1)  # [E, K, N]
    q = q.transpose(1, 2)
    packed = (q[..., 0::2] | (q[..., 1::2] << 4)).to(torch.uint8).contiguous()
    return packed, w.scales.transpose(1, 2).contiguous()


# ---------------------------------------------------------------- packed experts on the GPU
def gptq_experts(e, k, n, bits, group, *, act_order=False, gen=None) -> GPTQExperts:
    """Random sym GPTQ (v1 zeros) experts ``[k -> n]``, built on the GPU."""
    groups = k // group
    q = torch.randint(0, 2**bits, (e, k, n), device=DEV, dtype=torch.int32, generator=gen)
    qweight = pack_int32(q, bits, dim=1)
    del q
    z = torch.full((e, groups, n), 2 ** (bits - 1) - 1, device=DEV, dtype=torch.int32)
    scales = ((torch.rand(e, groups, n, device=DEV, generator=gen) + 0.5) / (2**bits * k**0.5)).to(torch.bfloat16)
    g_idx = None
    if act_order:
        g_idx = torch.stack([torch.randperm(k, device=DEV, generator=gen) // group for _ in range(e)]).to(torch.int32)
    return GPTQExperts(qweight, pack_int32(z, bits, dim=2), scales, g_idx, bits, group, 1)


def fp8_experts(e, k, n, block=(128, 128), gen=None) -> FP8Experts:
    w = (torch.randn(e, n, k, device=DEV, generator=gen) * 2).to(torch.float8_e4m3fn)
    s = torch.rand(e, math.ceil(n / block[0]), math.ceil(k / block[1]), device=DEV, generator=gen) * 0.4 / k**0.5
    return FP8Experts(w, s + 0.1 / k**0.5, block)


def expert_f64(w, e: int) -> torch.Tensor:
    """Expert ``e`` of a stacked weight in float64, ``[N, K]`` (dense, GPTQ or FP8; or a dict
    ``global id -> (stacked weight, local index)`` for experts held in several sets)."""
    if isinstance(w, dict):
        stacked, local = w[e]
        return expert_f64(stacked, local)
    if isinstance(w, torch.Tensor):
        return w[e].double()
    if isinstance(w, FP8Experts):
        return fp8_block_dequant_ref(w.weight[e], w.scale[e], w.block_size, torch.float64)
    one = w.expert(e)
    decoded = gptq_dequant_ref(one.qweight, one.qzeros, one.scales, one.g_idx, bits=w.bits, group_size=w.group_size,
                               zero_offset=w.zero_offset, out_dtype=torch.float64)  # fmt: skip
    return unsort_rows(decoded, one)  # rows sorted at load (act-order) back in checkpoint order


def moe_ref_rows(x, w13, w2, tw, ti, rows) -> torch.Tensor:
    """Float64 MoE output of the tokens ``rows`` (SiLU), expert by expert."""
    xs, ids, ws = x[rows].double(), ti[rows].long(), tw[rows].double()
    out = torch.zeros(len(rows), x.shape[1], dtype=torch.float64, device=x.device)
    for e in torch.unique(ids).tolist():
        r, j = torch.nonzero(ids == e, as_tuple=True)
        gu = xs[r] @ expert_f64(w13, e).T
        g, u = gu.chunk(2, dim=-1)
        y = (F.silu(g) * u) @ expert_f64(w2, e).T
        out.index_add_(0, r, y * ws[r, j][:, None])
    return out


def check(fn, x, w13, w2, tw, ti, gen, rows_max=32) -> float:
    """Relative error of ``fn()`` against float64 on up to ``rows_max`` random tokens; NaN-poisoned output."""
    y = fn()
    if torch.isnan(y).any():
        return float("nan")
    t = x.shape[0]
    rows = torch.randperm(t, device=DEV, generator=gen)[: min(t, rows_max)]
    ref = moe_ref_rows(x, w13, w2, tw, ti, rows)
    return float((y[rows].double() - ref).norm() / ref.norm())


# ---------------------------------------------------------------- routing and timing
def routing(t, e, top_k, zipf: float, gen) -> tuple[torch.Tensor, torch.Tensor]:
    p = torch.ones(e, device=DEV, dtype=torch.float64)
    if zipf:
        p = 1.0 / torch.arange(1, e + 1, device=DEV, dtype=torch.float64) ** zipf
        p = p[torch.randperm(e, device=DEV, generator=gen)]
    ids = torch.multinomial(p.expand(t, e).contiguous(), top_k, replacement=False, generator=gen).to(torch.int32)
    w = torch.softmax(torch.randn(t, top_k, device=DEV, generator=gen), dim=-1)
    return w, ids


def graph_time_us(calls, replays: int = 10) -> float:
    """Median GPU time (us) of one call, from CUDA-graph replays of all ``calls`` in turn."""
    for c in calls:
        c()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for c in calls:
            c()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1000 / len(calls))
    del g
    return sorted(times)[len(times) // 2]


def device_card(bw: float) -> str:
    """One line naming the GPU, the software and the date (the head of every benchmark table)."""
    import datetime

    props = torch.cuda.get_device_properties(0)
    return (f"{torch.cuda.get_device_name()} ({props.multi_processor_count} SMs, "
            f"{props.total_memory / 2**30:.0f} GiB), torch {torch.__version__}, triton {triton.__version__}, "
            f"copy rate {bw / 1e12:.2f} TB/s, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")


def copy_bandwidth() -> float:
    """Device-to-device copy rate, bytes read + written per second."""
    a = torch.randint(0, 255, (2**30,), dtype=torch.uint8, device=DEV)
    b = torch.empty_like(a)
    for _ in range(50):  # let the clocks come up
        b.copy_(a)
    us = min(graph_time_us([lambda: b.copy_(a)] * 4, replays=10) for _ in range(3))
    return 2 * a.numel() / (us * 1e-6)


def expert_bytes(w) -> float:
    if isinstance(w, FP8Experts):
        return (w.weight.nbytes + w.scale.nbytes) / w.weight.shape[0]
    if isinstance(w, GPTQExperts):
        return (w.qweight.nbytes + w.qzeros.nbytes + w.scales.nbytes) / w.qweight.shape[0]
    return w.nbytes / w.shape[0]
