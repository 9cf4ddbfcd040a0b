"""The serving layout of the demo plan: which modules are packed, which decoded and why, bytes as served."""

from __future__ import annotations

from pathlib import Path

import yaml

from sglang.srt.enhanced.config import EnhancedConfig, Precision
from sglang.srt.enhanced.mixed_precision.plan import build_plan
from sglang.srt.enhanced.mixed_precision.serving.layout import build_layout, format_layout, served_nbytes
from sglang.srt.enhanced.mixed_precision.sources import open_sources

REPO = Path(__file__).resolve().parents[2]


def demo_layout(demo_checkpoints, serve: str = "packed", **rules: str):  # noqa: ANN001, ANN201
    mp = yaml.safe_load((REPO / "mixed_precision_config.yaml").read_text())["mixed_precision"]
    mp.update({f"{p}_path": str(path) for p, path in demo_checkpoints.items()}, serve=serve)
    mp["weight_mapping"].update(rules)
    config = EnhancedConfig.from_mapping({"mixed_precision": mp}, model_path=demo_checkpoints["bf16"])
    with open_sources(config) as sources:
        plan = build_plan(config, sources)
        return plan, build_layout(plan, sources, config.mixed_precision.serve)


def test_demo_modules_are_packed(demo_checkpoints) -> None:  # noqa: ANN001
    plan, layout = demo_layout(demo_checkpoints)
    methods = {name: m.method_name for name, m in layout.modules.items()}
    assert methods == {
        f"model.layers.{i}.{m}": method
        for i in (0, 1)
        for m, method in (("mlp.experts", "gptq-4bit-g32"), ("mlp.shared_expert.gate_up_proj", "fp8-block32x32"),
                          ("mlp.shared_expert.down_proj", "fp8-block32x32"))
    }
    served = served_nbytes(layout, plan)
    summary = plan.summary()
    # Packed weights keep their stored bytes (int4 less the identity g_idx); bf16 is unchanged.
    assert served[Precision.FP8] == summary[Precision.FP8].bytes_on_disk
    assert served[Precision.INT4] < summary[Precision.INT4].bytes_on_disk < summary[Precision.INT4].bytes_loaded
    assert served[Precision.BF16] == summary[Precision.BF16].bytes_loaded
    text = format_layout(layout, plan)
    assert "model.layers.0.mlp.experts" in text and "gptq-4bit-g32" in text


def test_mixed_parts_are_decoded_with_the_reason(demo_checkpoints) -> None:  # noqa: ANN001
    _plan, layout = demo_layout(demo_checkpoints, **{"model.layers.0.self_attn.q_proj.weight": "int4"})
    qkv = layout.modules["model.layers.0.self_attn.qkv_proj"]
    assert qkv.method == "decoded"
    assert qkv.precisions == (Precision.BF16, Precision.INT4) and "parts mix bf16, int4" in qkv.reason
    assert layout.modules["model.layers.0.mlp.experts"].method == "packed"


def test_experts_in_several_formats_are_served_packed_mixed(demo_checkpoints) -> None:  # noqa: ANN001
    """Per-expert rules (exact names, a regex) make layer 1's FusedMoE packed-mixed: one set per format and slot."""
    plan, layout = demo_layout(demo_checkpoints, **{
        "model.layers.1.mlp.experts.0.down_proj.weight": "fp8",
        "model.layers.1.mlp.experts.1.gate_proj.weight": "bf16",
        "model.layers.1.mlp.experts.1.up_proj.weight": "bf16",
        r"re:model\.layers\.1\.mlp\.experts\.[23]\.(gate|up|down)_proj\.weight": "fp8",
    })
    experts = layout.modules["model.layers.1.mlp.experts"]
    assert experts.method == "packed" and experts.method_name == "packed-mixed"
    assert experts.precisions == (Precision.BF16, Precision.FP8, Precision.INT4)
    assert {(s.slot, s.format_name): s.experts for s in experts.expert_sets} == {
        ("w13", "fp8-block32x32"): (2, 3), ("w13", "gptq-4bit-g32"): (0,), ("w13", "unquantized"): (1,),
        ("w2", "fp8-block32x32"): (0, 2, 3), ("w2", "gptq-4bit-g32"): (1,)}
    assert experts.expert_formats() == {"fp8-block32x32": 2, "gate/up gptq-4bit-g32, down fp8-block32x32": 1,
                                        "gate/up unquantized, down gptq-4bit-g32": 1}
    # Every quantized weight keeps its stored bytes (int4 less the identity g_idx), bf16 its size.
    served = served_nbytes(layout, plan)
    summary = plan.summary()
    assert served[Precision.FP8] == summary[Precision.FP8].bytes_on_disk
    assert served[Precision.BF16] == summary[Precision.BF16].bytes_loaded
    assert "packed-mixed (fp8-block32x32: 2; gate/up gptq-4bit-g32, down fp8-block32x32: 1;" in \
        format_layout(layout, plan)


def test_serve_decoded_decodes_every_module(demo_checkpoints) -> None:  # noqa: ANN001
    plan, layout = demo_layout(demo_checkpoints, serve="decoded")
    assert {m.method for m in layout.modules.values()} == {"decoded"}
    assert served_nbytes(layout, plan) == {p: t.bytes_loaded for p, t in plan.summary().items()}
