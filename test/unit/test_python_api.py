"""The seed's Python API on a transformers MoE model: load per the YAML, generate, read the stats."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from readme_blocks import code_block

from sglang.srt.enhanced.errors import EnhancedError


@pytest.fixture()
def hf_model(tiny_model_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tiny_model_factory("qwen2_moe", dtype=torch.float32)
    torch.manual_seed(123)  # a differently initialised model: every weight must come from the checkpoint
    model = AutoModelForCausalLM.from_config(AutoModelForCausalLM.from_pretrained(folder).config).eval()
    model.config._name_or_path = str(folder)
    return folder, model, AutoTokenizer.from_pretrained(folder)


def write_config(tmp_path, folder, mapping=None):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({"mixed_precision": {"fp32_path": str(folder), "weight_mapping": mapping or {}},
                                    "inference": {"dtype": "float32"}}))
    return path


def test_load_then_generate_fills_statistics(tmp_path, hf_model):
    from transformers import AutoModelForCausalLM

    from sglang.srt.enhanced_model_loader import (
        export_expert_activation_stats,
        get_expert_activation_stats,
        load_model_with_enhanced_features,
        reset_expert_activation_stats,
    )
    from sglang.srt.model_loader.enhanced_mixed_precision_loader import get_global_expert_tracker

    folder, model, tok = hf_model
    reference = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    stats = load_model_with_enhanced_features(model, write_config(tmp_path, folder), enable_expert_tracking=True)
    assert sum(stats["tensors"].values()) == len(reference.state_dict())
    for name, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name
    assert get_global_expert_tracker() is not None

    reset_expert_activation_stats()
    ids = tok("Hello world, the quick brown fox", return_tensors="pt").input_ids
    new_tokens = 4
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         do_sample=False)
    assert out.shape[1] == ids.shape[1] + new_tokens
    expert_stats = get_expert_activation_stats()
    top_k = model.config.num_experts_per_tok
    forwarded = ids.shape[1] + new_tokens - 1  # the prompt, then one token per decode step
    for layer in ("0", "1"):
        assert expert_stats["layer_stats"][layer]["total_tokens"] == top_k * forwarded
        assert expert_stats["layer_stats"][layer]["total_experts"] == model.config.num_experts
    assert expert_stats["top_experts"][0]["total_tokens_processed"] == max(
        e["total_tokens_processed"] for e in expert_stats["expert_stats"].values())
    one = get_expert_activation_stats(layer_id=0, expert_id=1)
    assert one == expert_stats["expert_stats"]["layer_0_expert_1"]

    target = tmp_path / "expert_stats.json"
    export_expert_activation_stats(str(target))
    assert json.loads(target.read_text())["layer_stats"]["0"]["total_tokens"] == top_k * forwarded


def test_loader_class_methods(tmp_path, hf_model):
    from sglang.srt.enhanced_model_loader import EnhancedModelLoader

    folder, model, tok = hf_model
    loader = EnhancedModelLoader(str(write_config(tmp_path, folder)), enable_expert_tracking=True)
    with pytest.raises(EnhancedError):
        loader.get_top_experts()
    loader.load_model(model, enable_moe_tracking=True)
    ids = tok("One two three", return_tensors="pt").input_ids
    with torch.no_grad():
        model(ids)
    top = loader.get_top_experts(top_k=2)
    assert len(top) == 2 and top[0]["total_tokens_processed"] >= top[1]["total_tokens_processed"]
    layers = loader.get_layer_stats()
    assert set(layers) == {0, 1} and layers[0]["total_tokens"] == ids.shape[1] * model.config.num_experts_per_tok
    assert loader.get_expert_stats(layer_id=1)["layer_stats"].keys() == {"1"}
    loader.reset_expert_stats()
    assert loader.get_layer_stats()[0]["total_tokens"] == 0
    loader.export_expert_stats(tmp_path / "stats.csv")
    assert (tmp_path / "stats.csv").read_text().count("\n") == 1 + 2 * model.config.num_experts


def test_bad_mapping_names_the_key(tmp_path, hf_model):
    from sglang.srt.enhanced_model_loader import load_model_with_enhanced_features

    folder, model, _ = hf_model
    cfg = write_config(tmp_path, folder, {"model.layers.9.mlp.gate.weight": "fp32"})
    with pytest.raises(EnhancedError, match="model.layers.9.mlp.gate.weight"):
        load_model_with_enhanced_features(model, cfg)


def test_readme_python_api_example_runs_as_written_on_the_demo(demo_checkpoints, monkeypatch, capsys):
    from safetensors.torch import load_file

    from sglang.srt.enhanced.mixed_precision.decoders.gptq import GPTQDequantizer

    monkeypatch.chdir(Path(__file__).resolve().parents[2])  # the example runs from the repository root
    namespace: dict = {}
    example = code_block("### 3. The Python API", "python")
    exec(compile(example, "README_ENHANCED_FEATURES.md", "exec"), namespace)

    model, output, expert_stats = namespace["model"], namespace["output"], namespace["expert_stats"]
    assert "expert stats: {" in capsys.readouterr().out
    # 2 layers x 4 routed experts x 3 projections from GPTQ; 2 layers x 3 shared-expert projections from FP8
    assert namespace["stats"]["tensors"]["int4"] == 24 and namespace["stats"]["tensors"]["fp8"] == 6
    packed = load_file(demo_checkpoints["int4"] / "model.safetensors")
    prefix = "model.layers.1.mlp.experts.2.up_proj"
    expected = GPTQDequantizer.dequantize_gptq_weight(
        packed[f"{prefix}.qweight"], packed[f"{prefix}.qzeros"], packed[f"{prefix}.scales"], None, 4, 32,
        out_dtype=torch.float64,
    )
    loaded = model.state_dict()[f"{prefix}.weight"]  # the expert as decoded into the model's float32
    torch.testing.assert_close(loaded.double(), expected, rtol=1e-6, atol=1e-7)
    forwarded = output.shape[1] - 1  # the prompt once, then every generated token but the last
    for layer in ("0", "1"):
        assert expert_stats["layer_stats"][layer]["total_tokens"] == model.config.num_experts_per_tok * forwarded
