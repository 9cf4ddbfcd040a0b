"""Loading a plan into a transformers Qwen2-MoE model: exact round trips, mixed GPTQ/FP8/bf16, errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from sglang.srt.enhanced.config import EnhancedConfig, Precision
from sglang.srt.enhanced.errors import EnhancedError
from sglang.srt.enhanced.mixed_precision.hf import load_plan_into_module
from sglang.srt.enhanced.mixed_precision.plan import build_plan
from sglang.srt.enhanced.mixed_precision.sources import open_sources
from sglang.srt.enhanced.mixed_precision.weights import iter_plan_weights
from sglang.srt.enhanced.tools import quantize

TOKENS = torch.tensor([[1, 5, 9, 33, 70, 127, 2, 64]])


def tiny_config(**overrides: object) -> transformers.Qwen2MoeConfig:
    kw = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=4,
        num_experts_per_tok=2,
    )
    kw.update(overrides)
    return transformers.Qwen2MoeConfig(**kw)


def fresh_model(seed: int, **overrides: object) -> torch.nn.Module:
    torch.manual_seed(seed)
    return transformers.Qwen2MoeForCausalLM(tiny_config(**overrides)).eval()


def save(model: torch.nn.Module, folder: Path) -> Path:
    model.save_pretrained(str(folder), safe_serialization=True)
    return folder


def load(
    folder: Path, target: torch.nn.Module, mapping: dict[str, str], *, strict: bool = True, **section: str
):
    config = EnhancedConfig.from_mapping(
        {"mixed_precision": {"weight_mapping": mapping, **section}}, model_path=folder
    )
    sources = open_sources(config)
    plan = build_plan(config, sources)
    return plan, load_plan_into_module(target, plan, sources, strict=strict)


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


@pytest.fixture(scope="module")
def fp32_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    model = fresh_model(0)
    return model, save(model, tmp_path_factory.mktemp("qwen2_moe_fp32"))


def test_unquantized_mapping_is_bit_identical(fp32_model: tuple[torch.nn.Module, Path]) -> None:
    original, folder = fp32_model
    target = fresh_model(1)
    embed = "model.embed_tokens.weight"
    assert not torch.equal(target.state_dict()[embed], original.state_dict()[embed])
    plan, stats = load(
        folder, target, {"model.layers.*.self_attn.*": "fp16", "*": "bf16"}, fp16_path=str(folder)
    )
    assert_same_state(original, target)
    with torch.no_grad():
        assert torch.equal(target(TOKENS).logits, original(TOKENS).logits)
    n_attn = sum(1 for e in plan if ".self_attn." in e.name)
    assert stats.tensors == {Precision.FP16: n_attn, Precision.BF16: len(plan) - n_attn}
    assert stats.total_tensors == len(original.state_dict())


def test_tied_embeddings(tmp_path: Path) -> None:
    original = fresh_model(0, tie_word_embeddings=True)
    folder = save(original, tmp_path / "tied")
    assert "lm_head.weight" not in load_file(str(folder / "model.safetensors"))
    target = fresh_model(1, tie_word_embeddings=True)
    plan, _ = load(folder, target, {})
    assert "lm_head.weight" not in plan
    assert target.lm_head.weight is target.model.embed_tokens.weight
    assert_same_state(original, target)


def test_weight_without_parameter(fp32_model: tuple[torch.nn.Module, Path], tmp_path: Path) -> None:
    original, folder = fp32_model
    copy = Path(shutil.copytree(folder, tmp_path / "extra"))
    save_file({"model.extra.weight": torch.ones(3)}, str(copy / "extra.safetensors"))
    with pytest.raises(EnhancedError) as info:
        load(copy, fresh_model(1), {})
    assert info.value.culprit == "model.extra.weight"
    target = fresh_model(1)
    _, stats = load(copy, target, {}, strict=False)
    assert_same_state(original, target)
    assert stats.total_tensors == len(original.state_dict()) + 1


def test_parameters_never_loaded(fp32_model: tuple[torch.nn.Module, Path]) -> None:
    original, folder = fp32_model
    config = EnhancedConfig.from_mapping({}, model_path=folder)
    sources = open_sources(config)
    left_out = ["model.layers.1.mlp.gate.weight", "model.norm.weight"]
    names = [n for n in original.state_dict() if n not in left_out]
    plan = build_plan(config, sources, names)
    with pytest.raises(EnhancedError) as info:
        load_plan_into_module(fresh_model(1), plan, sources)
    assert info.value.culprit == "model.layers.1.mlp.gate.weight"
    assert f"2 parameters/buffers were not loaded: {left_out}" in info.value.msg
    target = fresh_model(1)
    before = target.model.norm.weight.clone()
    load_plan_into_module(target, plan, sources, strict=False)
    assert torch.equal(target.lm_head.weight, original.lm_head.weight)
    assert torch.equal(target.model.norm.weight, before)


def test_shape_mismatch(fp32_model: tuple[torch.nn.Module, Path]) -> None:
    _, folder = fp32_model
    with pytest.raises(EnhancedError) as info:
        load(folder, fresh_model(1, vocab_size=96), {})
    assert info.value.culprit in {"model.embed_tokens.weight", "lm_head.weight"}
    assert "(128, 64)" in info.value.msg and "(96, 64)" in info.value.msg


# -- mixed GPTQ / FP8 / bf16 ----------------------------------------------------------------------


def unpack_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """``packed[r, c]`` holds values of rows ``r * 32 // bits + j`` at bit ``j * bits`` (j < 32 // bits)."""
    per = 32 // bits
    words = packed.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(per, dtype=torch.int64) * bits
    values = (words.unsqueeze(1) >> shifts.view(1, per, 1)) & ((1 << bits) - 1)  # [r, j, c]
    return values.reshape(packed.shape[0] * per, packed.shape[1])


def gptq_reference(parts: dict[str, torch.Tensor], bits: int, zero_offset: int) -> torch.Tensor:
    """Float64 ``w[o, i] = scales[g, o] * (q[i, o] - zero[g, o] - offset)``, ``g = g_idx[i]``; returns [out, in]."""
    q = unpack_rows(parts["qweight"], bits)  # [in, out]
    zeros = unpack_rows(parts["qzeros"].t().contiguous(), bits).t()  # [groups, out]
    g = parts["g_idx"].to(torch.long)
    w = parts["scales"].to(torch.float64)[g] * (q - zeros[g] - zero_offset).to(torch.float64)
    return w.t()


def fp8_block_reference(
    weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]
) -> torch.Tensor:
    out_f, in_f = weight.shape
    rows = torch.arange(out_f) // block[0]
    cols = torch.arange(in_f) // block[1]
    return weight.to(torch.float64) * scale_inv.to(torch.float64)[rows][:, cols]


def read_all(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(file)))
    return out


@pytest.fixture(scope="module")
def mixed_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mixed")
    bf16 = save(fresh_model(0).to(torch.bfloat16), root / "bf16")
    gptq = quantize.quantize_checkpoint(
        bf16, root / "gptq", "gptq", bits=4, group_size=32, sym=False, desc_act=True, max_shard_size="64KB"
    )
    fp8 = quantize.quantize_checkpoint(bf16, root / "fp8", "fp8-block", block_size=(16, 32))
    return {"bf16": bf16, "gptq": gptq, "fp8": fp8}


MIXED = {
    "model.layers.*.self_attn.*": "bf16",
    "model.layers.*.mlp.experts.*": "int4",
    "model.layers.*.mlp.shared_expert.*": "fp8",
}


def mixed_plan(folders: dict[str, Path]):
    config = EnhancedConfig.from_mapping(
        {
            "mixed_precision": {
                "int4_path": str(folders["gptq"]),
                "fp8_path": str(folders["fp8"]),
                "weight_mapping": MIXED,
            }
        },
        model_path=folders["bf16"],
    )
    sources = open_sources(config)
    return build_plan(config, sources), sources


def test_mixed_mapping_matches_independent_dequantization(mixed_folders: dict[str, Path]) -> None:
    assert (mixed_folders["gptq"] / "model.safetensors.index.json").is_file()  # sharded GPTQ copy
    plan, sources = mixed_plan(mixed_folders)
    counts = {p: t.tensors for p, t in plan.summary().items()}
    n_total = len(fresh_model(0).state_dict())
    assert counts == {Precision.BF16: n_total - 24 - 6, Precision.FP8: 6, Precision.INT4: 24}

    target = fresh_model(1)
    stats = load_plan_into_module(target, plan, sources)
    assert stats.tensors == counts

    plain = read_all(mixed_folders["bf16"])
    gptq = read_all(mixed_folders["gptq"])
    fp8 = read_all(mixed_folders["fp8"])
    qc = json.loads((mixed_folders["gptq"] / "quantize_config.json").read_text())
    zero_offset = 1 if qc["checkpoint_format"] == "gptq" else 0
    block = tuple(
        json.loads((mixed_folders["fp8"] / "config.json").read_text())["quantization_config"][
            "weight_block_size"
        ]
    )
    for name, value in target.state_dict().items():
        prefix = name.removesuffix(".weight")
        if ".mlp.experts." in name:
            parts = {k: gptq[f"{prefix}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx")}
            expected = gptq_reference(parts, qc["bits"], zero_offset)
        elif ".mlp.shared_expert." in name:
            expected = fp8_block_reference(fp8[name], fp8[f"{prefix}.weight_scale_inv"], block)
        else:
            expected = plain[name]
        assert torch.equal(value, expected.to(torch.float32)), name
    # Quantized weights stay close to the bf16 originals (RTN error is at most half a step).
    expert = "model.layers.1.mlp.experts.2.down_proj.weight"
    err = (target.state_dict()[expert] - plain[expert].float()).abs().max()
    assert 0 < err < 0.05
    with torch.no_grad():
        assert torch.isfinite(target(TOKENS).logits).all()


def test_batched_expert_decoding_matches_one_by_one(mixed_folders: dict[str, Path]) -> None:
    plan, sources = mixed_plan(mixed_folders)
    decoder = sources[Precision.INT4].decoder
    calls: list[list[str]] = []
    real = decoder.decode_many

    def spy(names, parts_list, dtype):
        calls.append(list(names))
        return real(names, parts_list, dtype)

    decoder.decode_many = spy  # type: ignore[method-assign]
    batched = dict(iter_plan_weights(plan, sources, dtype=torch.float32, progress=False, batch_experts=True))
    assert calls and sum(len(c) for c in calls) == 24 and len(calls) < 24
    for names in calls:
        assert (
            len({n.split(".experts.")[0] + "." + n.split(".")[-2] for n in names}) == 1
        )  # one layer, one proj
    calls.clear()
    single = list(iter_plan_weights(plan, sources, dtype=torch.float32, progress=False, batch_experts=False))
    assert calls == []
    assert len(single) == len(batched) == len(plan)
    for name, tensor in single:
        assert torch.equal(batched[name], tensor), name
