"""The pre-load tensor-parallel check against the tiny models' real configs and checkpoint shapes."""

from __future__ import annotations

import json

import pytest
from safetensors import safe_open

from sglang.srt.enhanced.errors import EnhancedError
from sglang.srt.enhanced.tensor_parallel import (
    check_tensor_parallel,
    row_parallel_input,
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
    assert row_parallel_input("model.layers.0.self_attn.o_proj.weight", (64, 96)) == 96
    assert row_parallel_input("model.layers.0.mlp.experts.0.up_proj.weight", (32, 64)) is None


def test_packed_gptq_groups_must_not_straddle_ranks(tiny_model_factory, tmp_path) -> None:
    """Demo-like GPTQ groups of 32: the experts' down_proj input (32) splits into 16 rows per rank at TP=2."""
    from sglang.srt.enhanced.tools.quantize import quantize_checkpoint

    config, shapes = model_of(tiny_model_factory, "qwen2_moe")
    bf16 = tiny_model_factory("qwen2_moe")
    int4 = quantize_checkpoint(bf16, tmp_path / "int4", "gptq", bits=4, group_size=32, sym=True, desc_act=False)
    group_size = json.loads((int4 / "quantize_config.json").read_text())["group_size"]
    experts = {n: group_size for n in shapes if ".mlp.experts." in n}
    check_tensor_parallel(2, config, shapes)  # decoded: nothing packed, no group rule
    with pytest.raises(EnhancedError) as err:
        check_tensor_parallel(2, config, shapes, packed_groups=experts)
    assert err.value.culprit == "model.layers.0.mlp.experts.0.down_proj"
    assert "gives each rank 16 rows, not a multiple of group_size 32" in str(err.value)
    # 16-row groups fit; column-parallel gate/up never split an input; group -1 has no rule.
    check_tensor_parallel(2, config, shapes, packed_groups={n: 16 for n in experts})
    check_tensor_parallel(2, config, shapes, packed_groups={n: -1 for n in experts})


def test_tp_size_below_one_is_refused(tiny_model_factory) -> None:
    config, shapes = model_of(tiny_model_factory, "qwen2_moe")
    with pytest.raises(EnhancedError):
        check_tensor_parallel(0, config, shapes)
