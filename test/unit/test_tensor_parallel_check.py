"""The pre-load tensor-parallel check against the tiny models' real configs and checkpoint shapes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from sglang.srt.enhanced.errors import EnhancedError
from sglang.srt.enhanced.tensor_parallel import (
    PackedUnits,
    check_tensor_parallel,
    rank_piece,
    sharded_intermediate,
)


def model_of(tiny_model_factory, arch: str) -> tuple[dict, dict[str, tuple[int, ...]]]:
    folder = tiny_model_factory(arch)
    config = json.loads((folder / "config.json").read_text())
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    return config, shapes


@pytest.mark.parametrize("arch", ["qwen2_moe", "qwen3_moe", "mixtral", "olmoe", "deepseek_v3"])
def test_sizes_that_divide_pass(tiny_model_factory, arch: str) -> None:
    config, shapes = model_of(tiny_model_factory, arch)
    for tp_size in (1, 2, 4):  # 4 heads; KV heads 2 or 4; intermediate sizes 32 / 64 / 128
        check_tensor_parallel(tp_size, config, shapes)


def test_attention_heads_that_do_not_divide_name_the_module(tiny_model_factory) -> None:
    config, shapes = model_of(tiny_model_factory, "qwen2_moe")
    with pytest.raises(EnhancedError) as err:
        check_tensor_parallel(3, config, shapes)
    assert err.value.culprit == "model.layers.0.self_attn"
    assert "num_attention_heads 4 is not a multiple of 3" in str(err.value)


@pytest.mark.parametrize("heads, kv_heads, tp_size, fits", [
    (8, 4, 2, True),    # 2 KV heads per rank
    (8, 2, 4, True),    # each KV head replicated on 2 ranks
    (12, 4, 3, False),  # 4 KV heads over 3 ranks
    (12, 4, 6, False),  # 6 ranks, 4 KV heads: 6 % 4 != 0
    (12, 3, 6, True),
])  # fmt: skip
def test_kv_heads_follow_sglangs_split_or_replicate_rule(tiny_model_factory, heads, kv_heads, tp_size, fits) -> None:
    config, shapes = model_of(tiny_model_factory, "qwen2_moe")
    config = {**config, "num_attention_heads": heads, "num_key_value_heads": kv_heads}
    shapes = {n: s for n, s in shapes.items() if ".mlp." not in n}  # heads only
    if fits:
        check_tensor_parallel(tp_size, config, shapes)
        return
    with pytest.raises(EnhancedError) as err:
        check_tensor_parallel(tp_size, config, shapes)
    assert f"num_key_value_heads {kv_heads} must be a multiple of {tp_size} or divide it" in str(err.value)
    assert err.value.culprit == "model.layers.0.self_attn"


def test_mla_models_have_no_kv_head_rule(tiny_model_factory) -> None:
    config, shapes = model_of(tiny_model_factory, "deepseek_v3")
    check_tensor_parallel(4, {**config, "num_key_value_heads": 3}, shapes)


@pytest.mark.parametrize("arch, module", [
    ("qwen2_moe", "model.layers.0.mlp.experts.0.down_proj"),
    ("mixtral", "model.layers.0.block_sparse_moe.experts.0.w1"),
])  # fmt: skip
def test_intermediate_size_that_does_not_divide_names_the_projection(tiny_model_factory, arch, module) -> None:
    config, shapes = model_of(tiny_model_factory, arch)
    with pytest.raises(EnhancedError) as err:
        check_tensor_parallel(64, {**config, "num_attention_heads": 64, "num_key_value_heads": 64}, shapes)
    assert err.value.culprit == module
    assert "intermediate size" in str(err.value) and "is not a multiple of 64" in str(err.value)


def test_which_weights_are_sharded_along_the_intermediate_size() -> None:
    assert sharded_intermediate("model.layers.0.mlp.experts.3.gate_proj.weight", (32, 64)) == 32
    assert sharded_intermediate("model.layers.0.mlp.shared_expert.down_proj.weight", (64, 48)) == 48
    assert sharded_intermediate("model.layers.1.block_sparse_moe.experts.0.w2.weight", (64, 32)) == 32
    for replicated in ("model.layers.0.mlp.gate.weight", "model.layers.0.mlp.shared_expert_gate.weight",
                       "model.layers.0.self_attn.q_proj.weight", "lm_head.weight"):  # fmt: skip
        assert sharded_intermediate(replicated, (4, 64)) is None


@pytest.fixture(scope="module")
def demo_packed(demo_checkpoints):
    """Units of the shipped config's weights if served packed: GPTQ 4-bit groups of 32, FP8 blocks of 32 x 32."""
    from sglang.srt.enhanced.config import EnhancedConfig
    from sglang.srt.enhanced.launch import packed_units
    from sglang.srt.enhanced.mixed_precision.serving.layout import build_layout
    from sglang.srt.enhanced.mixed_precision.sglang_loader import prepare_plan

    shipped = Path(__file__).resolve().parents[2] / "mixed_precision_config.yaml"
    config = EnhancedConfig.from_yaml(shipped, model_path=demo_checkpoints["bf16"])
    plan, sources = prepare_plan(config, torch.bfloat16)
    try:
        packed, decoded = (packed_units(build_layout(plan, sources, serve)) for serve in ("packed", "decoded"))
    finally:
        for source in {id(s): s for s in sources.values()}.values():
            source.close()
    with safe_open(str(demo_checkpoints["bf16"] / "model.safetensors"), "pt") as f:
        shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    hf_config = json.loads((demo_checkpoints["bf16"] / "config.json").read_text())
    return hf_config, shapes, packed, decoded


def test_packed_units_come_from_the_checkpoints(demo_packed) -> None:
    _, _, packed, decoded = demo_packed
    assert decoded == {}  # weights decoded while loading are cut as floats
    expert = packed["model.layers.0.mlp.experts.0.down_proj.weight"]
    assert (expert.output, expert.input) == (8, 32)  # 8 4-bit values per word; groups of 32
    shared = packed["model.layers.0.mlp.shared_expert.down_proj.weight"]
    assert (shared.output, shared.input) == (32, 32)
    assert not any(".self_attn." in name for name in packed)  # bf16: nothing packed


def test_packed_gptq_groups_must_not_straddle_ranks(demo_packed) -> None:
    """The experts' down_proj input (32) gives 16 rows per rank at TP=2: half a group."""
    config, shapes, packed, _ = demo_packed
    check_tensor_parallel(2, config, shapes)  # decoded: no packed rule
    with pytest.raises(EnhancedError) as err:
        check_tensor_parallel(2, config, shapes, packed=packed)
    assert err.value.culprit == "model.layers.0.mlp.experts.0.down_proj"
    assert "16 input features per rank, not a multiple of a quantization group of 32 (32)" in str(err.value)
    # Groups of 16 (or act-order: words only) fit; gate/up cut outputs, in whole 8-value words.
    fitting = {n: PackedUnits(8, 16) if n.endswith("down_proj.weight") else u for n, u in packed.items()
               if ".experts." in n}  # fmt: skip
    check_tensor_parallel(2, config, shapes, packed=fitting)


def test_packed_fp8_blocks_must_not_straddle_ranks(demo_packed) -> None:
    config, shapes, packed, _ = demo_packed
    fp8 = {n: u for n, u in packed.items() if ".shared_expert." in n}
    check_tensor_parallel(2, config, shapes, packed=fp8)  # 64 / 2 = 32: one block per rank
    with pytest.raises(EnhancedError) as err:
        check_tensor_parallel(4, config, shapes, packed=fp8)
    assert err.value.culprit.startswith("model.layers.0.mlp.shared_expert.")
    assert "16" in str(err.value) and "an FP8 scale block (32)" in str(err.value)


def test_kv_pieces_of_replicated_heads() -> None:
    # 2 KV heads of 16 at TP=4: each rank holds one whole head (16 features), not 32 / 4.
    assert rank_piece("model.layers.0.self_attn.k_proj.weight", (32, 64), 4, 2) == ("output", 16)
    assert rank_piece("model.layers.0.self_attn.o_proj.weight", (64, 64), 4, 2) == ("input", 16)
    assert rank_piece("model.layers.0.mlp.gate.weight", (4, 64), 4, 2) is None


def test_tp_size_below_one_is_refused(tiny_model_factory) -> None:
    config, shapes = model_of(tiny_model_factory, "qwen2_moe")
    with pytest.raises(EnhancedError):
        check_tensor_parallel(0, config, shapes)


def test_only_modules_served_packed_have_packed_units(demo_checkpoints, tmp_path) -> None:
    """An int4 ``q_proj`` beside bf16 ``k_proj`` / ``v_proj`` makes ``qkv_proj`` decoded: cut as floats."""
    import yaml

    from sglang.srt.enhanced.config import EnhancedConfig
    from sglang.srt.enhanced.launch import packed_units
    from sglang.srt.enhanced.mixed_precision.serving.layout import build_layout
    from sglang.srt.enhanced.mixed_precision.sglang_loader import prepare_plan

    data = yaml.safe_load((Path(__file__).resolve().parents[2] / "mixed_precision_config.yaml").read_text())
    data["mixed_precision"].update({f"{p}_path": str(path) for p, path in demo_checkpoints.items()}, serve="packed")
    data["mixed_precision"]["weight_mapping"]["model.layers.0.self_attn.q_proj.weight"] = "int4"
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(data))
    config = EnhancedConfig.from_yaml(tmp_path / "config.yaml", model_path=demo_checkpoints["bf16"])
    plan, sources = prepare_plan(config, torch.bfloat16)
    try:
        layout = build_layout(plan, sources, "packed")
        units = packed_units(layout)
    finally:
        sources.close()
    assert layout.modules["model.layers.0.self_attn.qkv_proj"].method == "decoded"
    assert not any(".self_attn." in name for name in units)
    assert "model.layers.0.mlp.experts.0.down_proj.weight" in units  # the packed modules keep theirs
