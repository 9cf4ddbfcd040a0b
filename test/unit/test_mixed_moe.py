"""A FusedMoE whose experts come in several formats, served packed (one set per format) on the CPU.

Four experts of one layer: int4 (act-order GPTQ), FP8 with block scales and bf16, mixed per
expert and per slot (gate+up ``w13``, down ``w2``). The layer is built with SGLang's own
``FusedMoE`` and the packed config, filled through the parameters' ``weight_loader`` under
the names the model's ``load_weights`` maps checkpoint tensors to, and compared with a
float64 reference built from the stored tensors (decoded in float64, hand-written softmax
top-k and SiLU-gated experts). Activations are float32: the bound is float32 rounding of the
decode and the matmuls, relative 1e-5 of the output's scale (as for one-format layers).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_packed_methods import (  # noqa: F401 - sglang_cpu: the autouse fixture
    fp8_parts,
    fp8_ref64,
    gptq_parts,
    gptq_ref64,
    packed_format,
    part_layout,
    serving,
    sglang_cpu,
)

from sglang.srt.enhanced.config import Precision
from sglang.srt.enhanced.errors import EnhancedError
from sglang.srt.enhanced.mixed_precision.formats.gptq import GPTQFormat
from sglang.srt.enhanced.mixed_precision.serving.layout import ModuleLayout, PackedFormat, _decide

E, H, INTER, TOP_K, TOKENS = 4, 64, 64, 2, 12
PREFIX = "model.layers.0.mlp.experts"
INT4 = GPTQFormat(bits=4, group_size=32, desc_act=True)
ROLES = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
# expert -> (precision of gate and up, precision of down)
PLANNED = {0: ("int4", "int4"), 1: ("fp8", "fp8"), 2: ("bf16", "int4"), 3: ("int4", "fp8")}
PRECISION = {"int4": Precision.INT4, "fp8": Precision.FP8, "bf16": Precision.BF16}


def shape(proj: str) -> tuple[int, int]:
    return (H, INTER) if proj == "down_proj" else (INTER, H)


def quantize(weight: torch.Tensor, precision: str) -> dict[str, torch.Tensor]:
    if precision == "int4":
        return gptq_parts(weight, INT4)
    return fp8_parts(weight, "block") if precision == "fp8" else {"weight": weight.to(torch.bfloat16)}


def ref64(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    if "qweight" in parts:
        return gptq_ref64(parts, INT4)
    return fp8_ref64(parts) if "weight_scale_inv" in parts else parts["weight"].double()


def fmt_of(parts: dict[str, torch.Tensor]) -> PackedFormat:
    return PackedFormat() if set(parts) == {"weight"} else packed_format(parts, INT4 if "qweight" in parts else None)


@pytest.fixture(scope="module")
def stored() -> dict[tuple[int, str], dict[str, torch.Tensor]]:
    torch.manual_seed(13)
    return {(e, proj): quantize(torch.randn(*shape(proj)) / 8, PLANNED[e][proj == "down_proj"])
            for e in range(E) for proj in ROLES}


def mixed_layout(stored) -> ModuleLayout:  # noqa: ANN001
    parts = [part_layout(f"{PREFIX}.{e}.{proj}", p, fmt_of(p), *shape(proj), shard=ROLES[proj], expert=e,
                         precision=PRECISION[PLANNED[e][proj == "down_proj"]])
             for (e, proj), p in stored.items()]
    method, reason, sets = _decide(PREFIX, "moe", parts, "packed")
    assert method == "packed" and not reason
    return ModuleLayout(PREFIX, "moe", tuple(parts), method, reason, sets)


def load(stored, tp_size: int = 1, tp_rank: int = 0):  # noqa: ANN001, ANN201
    """The layer, filled as the model's ``load_weights`` fills it (checkpoint names -> ``w13_*`` / ``w2_*``)."""
    from sglang.srt.layers.moe.fused_moe_triton.layer import FusedMoE

    layer = FusedMoE(num_experts=E, top_k=TOP_K, hidden_size=H, intermediate_size=INTER, params_dtype=torch.float32,
                     renormalize=True, quant_config=serving(mixed_layout(stored)), tp_size=tp_size, prefix=PREFIX)
    layer.tp_rank = tp_rank
    params = dict(layer.named_parameters())
    for (e, proj), parts in stored.items():
        for suffix, tensor in parts.items():
            name = f"{'w2' if proj == 'down_proj' else 'w13'}_{suffix}"
            params[name].weight_loader(params[name], tensor, f"{PREFIX}.{name}", shard_id=ROLES[proj], expert_id=e)
    layer.quant_method.process_weights_after_loading(layer)
    return layer


def routing(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    weights, ids = torch.softmax(logits.double(), dim=-1).topk(TOP_K, dim=-1)
    return weights / weights.sum(dim=-1, keepdim=True), ids


def reference(stored, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
    weights, ids = routing(logits)
    out = torch.zeros(x.shape[0], H, dtype=torch.float64)
    for t in range(x.shape[0]):
        for w, e in zip(weights[t].tolist(), ids[t].tolist(), strict=True):
            g = x[t].double() @ ref64(stored[(e, "gate_proj")]).T
            u = x[t].double() @ ref64(stored[(e, "up_proj")]).T
            out[t] += w * ((F.silu(g) * u) @ ref64(stored[(e, "down_proj")]).T)
    return out


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    x, logits = torch.randn(TOKENS, H, generator=gen), torch.randn(TOKENS, E, generator=gen)
    assert set(routing(logits)[1].flatten().tolist()) == set(range(E))  # every expert (and set) is used
    return x, logits


def test_layout_lists_the_sets_and_the_formats(stored) -> None:  # noqa: ANN001
    layout = mixed_layout(stored)
    assert layout.method_name == "packed-mixed"
    sets = {(s.slot, s.format_name): s.experts for s in layout.expert_sets}
    assert sets == {("w13", "gptq-4bit-g32-act"): (0, 3), ("w13", "fp8-block32x32"): (1,),
                    ("w13", "unquantized"): (2,), ("w2", "gptq-4bit-g32-act"): (0, 2), ("w2", "fp8-block32x32"): (1, 3)}
    assert layout.expert_formats() == {
        "fp8-block32x32": 1, "gate/up gptq-4bit-g32-act, down fp8-block32x32": 1,
        "gate/up unquantized, down gptq-4bit-g32-act": 1, "gptq-4bit-g32-act": 1}
    assert layout.method_text.startswith("packed-mixed (fp8-block32x32: 1; ")


def test_mixed_layer_matches_float64(stored) -> None:  # noqa: ANN001
    layer = load(stored)
    x, logits = inputs()
    out = layer(x, logits)
    ref = reference(stored, x, logits)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    # Each set is stacked over its own experts only, in its stored dtype; nothing is decoded.
    params = dict(layer.named_parameters())
    assert params["w13_qweight"].shape[0] == 2 and params["w2_qweight"].shape[0] == 2
    assert "w13_g_idx" in params and "w2_g_idx" in params  # act-order: each GPTQ set keeps its row order
    assert params["w13_weight"].dtype == torch.float8_e4m3fn and params["w13_weight"].shape[0] == 1
    assert params["w13_weight_scale_inv"].shape == (1, 2 * INTER // 32, H // 32)
    assert params["w13_unquantized_weight"].shape == (1, 2 * INTER, H)
    assert params["w2_weight"].shape == (2, H, INTER)
    bf16 = torch.cat([stored[(2, "gate_proj")]["weight"], stored[(2, "up_proj")]["weight"]])
    assert torch.equal(params["w13_unquantized_weight"][0], bf16.float())


def test_tensor_parallel_pieces_add_up_to_the_layer(stored) -> None:  # noqa: ANN001
    """Two ranks (intermediate features cut in halves, on group and block bounds) sum to the whole layer."""
    x, logits = inputs()
    weights, ids = routing(logits)
    whole = load(stored).quant_method.weights
    from sglang.srt.enhanced.mixed_precision.serving.compute import moe_forward

    full = moe_forward(x, *whole, weights.float(), ids, "silu")
    parts = [moe_forward(x, *load(stored, 2, rank).quant_method.weights, weights.float(), ids, "silu")
             for rank in (0, 1)]
    torch.testing.assert_close(parts[0] + parts[1], full, rtol=1e-5, atol=1e-5 * float(full.abs().max()))
    ref = reference(stored, x, logits)
    torch.testing.assert_close((parts[0] + parts[1]).double(), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


def test_a_tensor_of_another_format_is_refused(stored) -> None:  # noqa: ANN001
    from sglang.srt.layers.moe.fused_moe_triton.layer import FusedMoE

    layer = FusedMoE(num_experts=E, top_k=TOP_K, hidden_size=H, intermediate_size=INTER, params_dtype=torch.float32,
                     renormalize=True, quant_config=serving(mixed_layout(stored)), tp_size=1, prefix=PREFIX)
    qweight = stored[(0, "gate_proj")]["qweight"]
    with pytest.raises(EnhancedError, match="expert 1's w13 is served as fp8-block32x32, which has no qweight") as err:
        layer.w13_qweight.weight_loader(layer.w13_qweight, qweight, f"{PREFIX}.w13_qweight", shard_id="w1",
                                        expert_id=1)
    assert err.value.culprit == f"{PREFIX}.w13_qweight"


def test_gate_and_up_in_different_formats_are_decoded(stored) -> None:  # noqa: ANN001
    parts = [part_layout(f"{PREFIX}.0.{proj}", p, fmt_of(p), *shape(proj), shard=ROLES[proj], expert=0)
             for proj, p in (("gate_proj", stored[(0, "gate_proj")]), ("up_proj", stored[(1, "up_proj")]),
                             ("down_proj", stored[(0, "down_proj")]))]
    method, reason, sets = _decide(PREFIX, "moe", parts, "packed")
    assert method == "decoded" and not sets
    assert "expert 0 has gate and up projections in different formats" in reason
