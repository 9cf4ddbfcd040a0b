"""Packed serving methods on the CPU: every GPTQ and FP8 variant against a float64 ``x @ W.T``.

Each case quantizes a random weight with our quantize tool, builds SGLang's own
``ReplicatedLinear`` / ``FusedMoE`` with the packed quantization config, fills it through
the parameters' ``weight_loader`` as the model's ``load_weights`` would, and compares the
module's output with a float64 reference computed from the stored tensors (decoded in
float64, then ``x @ W.T``; for MoE a hand-written softmax top-k and SiLU-gated experts).
Activations are float32, so the only differences are float32 roundings of the decode
and the matmul (relative 1e-5 of the output's scale).
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from sglang.srt.enhanced.config import Precision
from sglang.srt.enhanced.errors import EnhancedError
from sglang.srt.enhanced.mixed_precision.formats.fp8 import FP8Format, FP8Scale
from sglang.srt.enhanced.mixed_precision.formats.gptq import GPTQFormat
from sglang.srt.enhanced.mixed_precision.kernels.reference import (
    fp8_block_dequant_ref,
    fp8_scaled_dequant_ref,
    gptq_dequant_ref,
)
from sglang.srt.enhanced.mixed_precision.plan import PlanEntry
from sglang.srt.enhanced.mixed_precision.serving.layout import (
    ModuleLayout,
    PackedFormat,
    PartLayout,
    ServingLayout,
)
from sglang.srt.enhanced.tools.quantize import (
    fp8_block_quantize_tensor,
    fp8_scaled_quantize_tensor,
    gptq_quantize_tensor,
)

K, N = 256, 64  # 3-bit packing needs multiples of 32; group 128 gives two groups
GPTQ_CASES = [
    GPTQFormat(bits=b, group_size=g, sym=sym, desc_act=act, checkpoint_format=fmt)
    for b in (2, 3, 4, 8)
    for g, sym, act, fmt in ((32, True, False, "gptq"), (64, False, True, "gptq_v2"), (128, False, False, "gptq"),
                             (-1, True, True, "gptq_v2"))
]
FP8_CASES = ["block", "channel", "tensor"]


@pytest.fixture(scope="module", autouse=True)
def sglang_cpu():
    """SGLang's parallel state for one CPU process (left up for other modules to reuse)."""
    import socket

    import sglang.srt.layers.quantization  # noqa: F401 - SGLang's layers import in this order
    from sglang.srt.distributed import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        parallel_state.init_distributed_environment(
            backend="gloo", world_size=1, rank=0, local_rank=0, distributed_init_method=f"tcp://127.0.0.1:{port}"
        )
        parallel_state.initialize_model_parallel(1)


def gptq_parts(weight: torch.Tensor, fmt: GPTQFormat) -> dict[str, torch.Tensor]:
    return gptq_quantize_tensor(weight, fmt)


def gptq_ref64(parts: dict[str, torch.Tensor], fmt: GPTQFormat) -> torch.Tensor:
    return gptq_dequant_ref(parts["qweight"], parts["qzeros"], parts["scales"], parts["g_idx"], bits=fmt.bits,
                            group_size=fmt.group_size, zero_offset=fmt.zero_offset, out_dtype=torch.float64)


def fp8_parts(weight: torch.Tensor, kind: str) -> dict[str, torch.Tensor]:
    if kind == "block":
        return fp8_block_quantize_tensor(weight, (32, 32))
    return fp8_scaled_quantize_tensor(weight, per_channel=kind == "channel")


def fp8_ref64(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    if "weight_scale_inv" in parts:
        return fp8_block_dequant_ref(parts["weight"], parts["weight_scale_inv"], (32, 32), torch.float64)
    return fp8_scaled_dequant_ref(parts["weight"], parts["weight_scale"], torch.float64)


def packed_format(parts: dict[str, torch.Tensor], gptq: GPTQFormat | None) -> PackedFormat:
    if gptq is not None:
        return PackedFormat(gptq=gptq)
    if "weight_scale_inv" in parts:
        return PackedFormat(fp8=FP8Format((32, 32)), fp8_scale=FP8Scale.BLOCK)
    scale = FP8Scale.TENSOR if parts["weight_scale"].numel() == 1 else FP8Scale.CHANNEL
    return PackedFormat(fp8=FP8Format(), fp8_scale=scale)


def part_layout(name: str, parts: dict[str, torch.Tensor], fmt: PackedFormat, out_f: int, in_f: int,
                shard=None, expert=None, precision=Precision.INT4) -> PartLayout:  # noqa: ANN001
    stored = tuple(f"{name}.{k}" for k in parts)
    entry = PlanEntry(f"{name}.weight", precision, "test", stored, 0, out_f * in_f * 2)
    return PartLayout(entry, shard, expert, fmt, out_f, in_f, tuple((f"{name}.{k}", v.dtype) for k, v in parts.items()))


def serving(module: ModuleLayout):  # noqa: ANN201
    from sglang.srt.enhanced.mixed_precision.serving.quant_config import PackedQuantConfig

    return PackedQuantConfig(ServingLayout({module.name: module}, "packed"))


def load_linear(name: str, parts: dict[str, torch.Tensor], gptq: GPTQFormat | None, dtype: torch.dtype):  # noqa: ANN201
    from sglang.srt.layers.linear import ReplicatedLinear

    fmt = packed_format(parts, gptq)
    module = ModuleLayout(name, "linear", (part_layout(name, parts, fmt, N, K),), "packed")
    layer = ReplicatedLinear(K, N, bias=False, params_dtype=dtype, quant_config=serving(module), prefix=name)
    params = dict(layer.named_parameters())
    for suffix, tensor in parts.items():
        param = params["weight_scale" if suffix == "weight_scale" else suffix]
        param.weight_loader(param, tensor)
    layer.quant_method.process_weights_after_loading(layer)
    return layer


@pytest.mark.parametrize("fmt", GPTQ_CASES, ids=lambda f: f"{f.name}-{'sym' if f.sym else 'asym'}-{f.checkpoint_format}")
def test_gptq_linear_matches_float64(fmt: GPTQFormat) -> None:
    torch.manual_seed(fmt.bits * 1000 + fmt.group_size)
    parts = gptq_parts(torch.randn(N, K), fmt)
    layer = load_linear("model.layers.0.mlp.down_proj", parts, fmt, torch.float32)
    x = torch.randn(5, K)
    out, _ = layer(x)
    ref = x.double() @ gptq_ref64(parts, fmt).T
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    # Packed in memory: the stored tensors, not a float weight (g_idx only where it reorders rows).
    names = {n for n, _ in layer.named_parameters()}
    assert "weight" not in names and {"qweight", "qzeros", "scales"} <= names
    assert ("g_idx" in names) == (fmt.desc_act and fmt.group_size != -1)  # one group: the identity order


@pytest.mark.parametrize("kind", FP8_CASES)
def test_fp8_linear_matches_float64(kind: str) -> None:
    torch.manual_seed(len(kind))
    parts = fp8_parts(torch.randn(N, K), kind)
    layer = load_linear("model.layers.0.self_attn.o_proj", parts, None, torch.float32)
    x = torch.randn(7, K)
    out, _ = layer(x)
    ref = x.double() @ fp8_ref64(parts).T
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    assert layer.weight.dtype == torch.float8_e4m3fn


def test_bf16_activations_decode_to_bf16() -> None:
    """In the serving dtype the packed path equals a bf16 matmul with the bf16-decoded weight."""
    fmt = GPTQFormat(bits=4, group_size=32)
    parts = gptq_parts(torch.randn(N, K), fmt)
    layer = load_linear("model.layers.0.mlp.down_proj", parts, fmt, torch.bfloat16)
    x = torch.randn(3, K, dtype=torch.bfloat16)
    decoded = gptq_dequant_ref(parts["qweight"], parts["qzeros"], parts["scales"], None, bits=4, group_size=32,
                               zero_offset=1, out_dtype=torch.bfloat16)
    assert torch.equal(layer(x)[0], F.linear(x, decoded))


E, H, INTER, TOP_K = 4, 64, 64, 2
MOE_CASES = [GPTQFormat(bits=4, group_size=32), GPTQFormat(bits=3, group_size=32, sym=False, desc_act=True),
             GPTQFormat(bits=8, group_size=-1, checkpoint_format="gptq_v2"), "block", "channel", "tensor"]


@pytest.mark.parametrize("case", MOE_CASES, ids=lambda c: c if isinstance(c, str) else c.name)
def test_moe_matches_float64(case) -> None:  # noqa: ANN001
    from sglang.srt.layers.moe.fused_moe_triton.layer import FusedMoE

    torch.manual_seed(7)
    gptq = case if isinstance(case, GPTQFormat) else None
    quantize = (lambda w: gptq_parts(w, gptq)) if gptq else (lambda w: fp8_parts(w, case))
    ref64 = (lambda p: gptq_ref64(p, gptq)) if gptq else fp8_ref64
    prefix = "model.layers.0.mlp.experts"
    stored = {(e, proj): quantize(torch.randn(*(H, INTER) if proj == "down_proj" else (INTER, H)))
              for e in range(E) for proj in ("gate_proj", "up_proj", "down_proj")}
    roles = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
    fmt = packed_format(stored[(0, "gate_proj")], gptq)
    layout = ModuleLayout(prefix, "moe", tuple(
        part_layout(f"{prefix}.{e}.{proj}", parts, fmt, *((H, INTER) if proj == "down_proj" else (INTER, H)),
                    shard=roles[proj], expert=e)
        for (e, proj), parts in stored.items()), "packed")
    layer = FusedMoE(num_experts=E, top_k=TOP_K, hidden_size=H, intermediate_size=INTER, params_dtype=torch.float32,
                     renormalize=True, quant_config=serving(layout), tp_size=1, prefix=prefix)
    params = dict(layer.named_parameters())
    for (e, proj), parts in stored.items():
        for suffix, tensor in parts.items():
            name = f"{'w2' if proj == 'down_proj' else 'w13'}_{suffix}"
            params[name].weight_loader(params[name], tensor, name, shard_id=roles[proj], expert_id=e)
    layer.quant_method.process_weights_after_loading(layer)
    assert "w13_weight" not in dict(layer.named_parameters()) or fmt.fp8 is not None

    x, logits = torch.randn(9, H), torch.randn(9, E)
    out = layer(x, logits)
    probs = torch.softmax(logits.double(), dim=-1)
    weights, ids = probs.topk(TOP_K, dim=-1)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    ref = torch.zeros(9, H, dtype=torch.float64)
    for t in range(9):
        for w, e in zip(weights[t].tolist(), ids[t].tolist(), strict=True):
            g = x[t].double() @ ref64(stored[(e, "gate_proj")]).T
            u = x[t].double() @ ref64(stored[(e, "up_proj")]).T
            ref[t] += w * ((F.silu(g) * u) @ ref64(stored[(e, "down_proj")]).T)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


def test_moe_routes_through_sglang_select_experts(monkeypatch) -> None:  # noqa: ANN001
    """The packed MoE method calls ``sglang.srt.layers.moe.topk.select_experts`` (what the tracker hooks)."""
    from sglang.srt.layers.moe import topk

    calls = []
    original = topk.select_experts

    def spy(**kwargs):  # noqa: ANN003, ANN202
        calls.append(kwargs)
        return original(**kwargs)

    monkeypatch.setattr(topk, "select_experts", spy)
    test_moe_matches_float64(GPTQFormat(bits=4, group_size=32))
    assert len(calls) == 1 and calls[0]["top_k"] == TOP_K and calls[0]["renormalize"] is True


def test_partly_loaded_module_is_refused() -> None:
    from sglang.srt.layers.linear import ReplicatedLinear

    fmt = GPTQFormat(bits=4, group_size=32)
    parts = gptq_parts(torch.randn(N, K), fmt)
    name = "model.layers.0.mlp.down_proj"
    module = ModuleLayout(name, "linear", (part_layout(name, parts, PackedFormat(gptq=fmt), N, K),), "packed")
    layer = ReplicatedLinear(K, N, bias=False, params_dtype=torch.float32, quant_config=serving(module), prefix=name)
    layer.qweight.weight_loader(layer.qweight, parts["qweight"])
    with pytest.raises(EnhancedError, match="only partly loaded") as err:
        layer.quant_method.process_weights_after_loading(layer)
    assert err.value.culprit == name


def test_mixed_module_is_decoded_with_one_warning(caplog) -> None:  # noqa: ANN001
    from sglang.srt.enhanced.mixed_precision.serving.layout import _decide
    from sglang.srt.layers.linear import ReplicatedLinear, UnquantizedLinearMethod

    fmt = GPTQFormat(bits=4, group_size=32)
    name = "model.layers.0.self_attn.qkv_proj"
    q = part_layout("model.layers.0.self_attn.q_proj", gptq_parts(torch.randn(N, K), fmt), PackedFormat(gptq=fmt),
                    N, K, shard="q")
    k = part_layout("model.layers.0.self_attn.k_proj", {"weight": torch.randn(N, K)}, PackedFormat(), N, K,
                    shard="k", precision=Precision.BF16)
    method, reason, sets = _decide(name, "linear", [q, k], "packed")
    assert method == "decoded" and "bf16, int4" in reason and not sets
    module = ModuleLayout(name, "linear", (q, k), method, reason)
    with caplog.at_level(logging.WARNING):
        layer = ReplicatedLinear(K, N, bias=False, quant_config=serving(module), prefix=name)
    assert isinstance(layer.quant_method, UnquantizedLinearMethod)
    warnings = [r.getMessage() for r in caplog.records if name in r.getMessage()]
    assert len(warnings) == 1 and "bf16, int4" in warnings[0] and "decoded" in warnings[0]


def test_capture_safe_expert_path_equals_the_routed_loop() -> None:
    """The CUDA-graph-safe fallback (every expert, no host sync) computes what the routed loop does."""
    from sglang.srt.enhanced.mixed_precision.kernels.packed_weights import GPTQExperts
    from sglang.srt.enhanced.mixed_precision.serving.compute import _moe_every_expert, _moe_expert_loop

    torch.manual_seed(3)
    fmt = GPTQFormat(bits=4, group_size=32, desc_act=True)

    def stacked(shape: tuple[int, int]) -> GPTQExperts:
        parts = [gptq_parts(torch.randn(*shape), fmt) for _ in range(E)]
        g_idx = torch.stack([p["g_idx"] for p in parts])
        return GPTQExperts(*(torch.stack([p[k] for p in parts]) for k in ("qweight", "qzeros", "scales")),
                           g_idx, 4, 32, fmt.zero_offset)

    w13, w2 = stacked((2 * INTER, H)), stacked((H, INTER))
    x = torch.randn(6, H, dtype=torch.float64)
    weights, ids = torch.softmax(torch.randn(6, E), -1).topk(TOP_K, dim=-1)
    a = _moe_expert_loop(x, w13, w2, weights.double(), ids, "silu")
    b = _moe_every_expert(x, w13, w2, weights.double(), ids, "silu")
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(a.abs().max()))  # float32 accumulation
