"""Checkpoint-format decoders: detection, name mapping, decoding against float64 by hand, errors."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from sglang.srt.enhanced.errors import EnhancedError
from sglang.srt.enhanced.mixed_precision.decoders.fp8 import FP8Decoder
from sglang.srt.enhanced.mixed_precision.decoders.gptq import (
    GPTQDecoder,
    GPTQDequantizer,
    GPTQSettings,
    is_gptq_weight,
)
from sglang.srt.enhanced.mixed_precision.decoders.plain import PlainDecoder
from sglang.srt.enhanced.mixed_precision.decoders.registry import available_formats, decoder_for_checkpoint
from sglang.srt.enhanced.mixed_precision.packing import pack_int32

GPTQ_QC = {"quant_method": "gptq", "bits": 4, "group_size": 32, "sym": True, "desc_act": False}


def write_folder(root: Path, config: dict | None = None, quantize_config: dict | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    if config is not None:
        (root / "config.json").write_text(json.dumps(config))
    if quantize_config is not None:
        (root / "quantize_config.json").write_text(json.dumps(quantize_config))
    return root


# ------------------------------------------------------------------------------------------------
# registry


def test_registry_detects_each_format(tmp_path):
    assert {"plain", "gptq", "fp8", "compressed-tensors"} <= set(available_formats())
    plain = decoder_for_checkpoint(write_folder(tmp_path / "plain", {"model_type": "qwen2_moe"}))
    assert isinstance(plain, PlainDecoder)

    gptq = decoder_for_checkpoint(write_folder(tmp_path / "gptq", {"quantization_config": GPTQ_QC}))
    assert isinstance(gptq, GPTQDecoder)
    assert gptq.settings == GPTQSettings(
        bits=4, group_size=32, sym=True, desc_act=False, checkpoint_format="gptq"
    )

    only_qc = write_folder(
        tmp_path / "qc", {"model_type": "x"}, {"bits": 8, "group_size": -1, "checkpoint_format": "gptq_v2"}
    )
    dec = decoder_for_checkpoint(only_qc)
    assert isinstance(dec, GPTQDecoder) and dec.settings.bits == 8 and dec.settings.zero_offset == 0

    fp8 = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [128, 64],
    }
    dec = decoder_for_checkpoint(write_folder(tmp_path / "fp8", {"quantization_config": fp8}))
    assert isinstance(dec, FP8Decoder) and dec.weight_block_size == (128, 64)

    ct = {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": {"num_bits": 8, "type": "float", "strategy": "channel"},
            }
        },
    }
    dec = decoder_for_checkpoint(write_folder(tmp_path / "ct", {"quantization_config": ct}))
    assert isinstance(dec, FP8Decoder) and dec.weight_block_size is None


def test_registry_rejects_unknown_and_unsupported(tmp_path):
    with pytest.raises(EnhancedError) as err:
        decoder_for_checkpoint(
            write_folder(tmp_path / "awq", {"quantization_config": {"quant_method": "awq"}})
        )
    assert "gptq" in str(err.value) and "fp8" in str(err.value) and "quant_method" in str(err.value.culprit)

    ct_int4 = {
        "quant_method": "compressed-tensors",
        "config_groups": {"g": {"weights": {"num_bits": 4, "type": "int", "strategy": "group"}}},
    }
    with pytest.raises(EnhancedError) as err:
        decoder_for_checkpoint(write_folder(tmp_path / "ct4", {"quantization_config": ct_int4}))
    assert "config_groups.g.weights" in str(err.value.culprit)

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    with pytest.raises(EnhancedError) as err:
        decoder_for_checkpoint(bad)
    assert str(bad / "config.json") in str(err.value.culprit)

    with pytest.raises(EnhancedError):
        decoder_for_checkpoint(tmp_path / "missing")


@pytest.mark.parametrize(
    "change,key",
    [
        ({"bits": None}, "bits"),
        ({"bits": 5}, "bits"),
        ({"group_size": 0}, "group_size"),
        ({"group_size": "128"}, "group_size"),
        ({"sym": "yes"}, "sym"),
        ({"checkpoint_format": "marlin"}, "checkpoint_format"),
    ],
)
def test_gptq_settings_errors_name_file_and_key(tmp_path, change, key):
    qc = {**GPTQ_QC, **change}
    qc = {k: v for k, v in qc.items() if v is not None}
    folder = write_folder(tmp_path, {"quantization_config": qc})
    with pytest.raises(EnhancedError) as err:
        GPTQSettings.from_checkpoint_dir(folder)
    assert str(err.value.culprit) == f"{folder / 'config.json'}:quantization_config:{key}"


# ------------------------------------------------------------------------------------------------
# GPTQ


def gptq_layer(gen, in_f, out_f, bits=4, group_size=32, *, stored_zero=None, act_order=False):
    """Packed tensors of one layer plus a float64 weight reconstructed row by row."""
    groups = -(-in_f // group_size) if group_size != -1 else 1
    q = torch.randint(0, 2**bits, (in_f, out_f), generator=gen, dtype=torch.int32)
    if stored_zero is None:
        z = torch.randint(0, 2**bits - 1, (groups, out_f), generator=gen, dtype=torch.int32)
    else:
        z = torch.full((groups, out_f), stored_zero, dtype=torch.int32)
    s = (torch.rand(groups, out_f, generator=gen) * 0.05 + 0.01).to(torch.float16)
    if act_order:
        g = (torch.randperm(in_f, generator=gen) % groups).to(torch.int32)
    else:
        g = (torch.arange(in_f) // (group_size if group_size != -1 else in_f)).to(torch.int32)
    parts = {"qweight": pack_int32(q, bits, 0), "qzeros": pack_int32(z, bits, 1), "scales": s, "g_idx": g}

    def expected(zero_offset: int) -> torch.Tensor:
        w = torch.empty(out_f, in_f, dtype=torch.float64)
        for i in range(in_f):
            gi = int(g[i])
            w[:, i] = s[gi].double() * (q[i].double() - z[gi].double() - zero_offset)
        return w

    return parts, expected


def named(prefix: str, parts: dict) -> dict:
    return {f"{prefix}.{k}": v for k, v in parts.items()}


def test_gptq_name_mapping():
    dec = GPTQDecoder(GPTQSettings(group_size=32))
    stored = [
        "model.layers.0.mlp.experts.1.down_proj.qweight",
        "model.layers.0.mlp.experts.1.down_proj.qzeros",
        "model.layers.0.mlp.experts.1.down_proj.scales",
        "model.layers.0.mlp.experts.1.down_proj.g_idx",
        "model.layers.0.self_attn.q_proj.qweight",
        "model.layers.0.self_attn.q_proj.qzeros",
        "model.layers.0.self_attn.q_proj.scales",
        "model.layers.0.self_attn.q_proj.bias",
        "model.layers.0.mlp.gate.weight",
        "model.layers.0.input_layernorm.weight",
        "model.embed_tokens.weight",
    ]
    mapping = dec.logical_names(stored)
    assert mapping["model.layers.0.mlp.experts.1.down_proj.weight"] == (
        "model.layers.0.mlp.experts.1.down_proj.qweight",
        "model.layers.0.mlp.experts.1.down_proj.qzeros",
        "model.layers.0.mlp.experts.1.down_proj.scales",
        "model.layers.0.mlp.experts.1.down_proj.g_idx",
    )
    assert len(mapping["model.layers.0.self_attn.q_proj.weight"]) == 3
    for name in (
        "model.layers.0.self_attn.q_proj.bias",
        "model.layers.0.mlp.gate.weight",
        "model.embed_tokens.weight",
    ):
        assert mapping[name] == (name,)
    assert len(mapping) == 6
    with pytest.raises(EnhancedError) as err:
        dec.logical_names(["a.qweight", "a.qzeros"])
    assert err.value.culprit == "a.weight" and "a.scales" in str(err.value)


@pytest.mark.parametrize(
    "bits,group_size,fmt,act_order",
    [
        (4, 32, "gptq", False),
        (4, 32, "gptq_v2", True),
        (8, -1, "gptq", False),
        (2, 64, "gptq_v2", False),
        (3, 32, "gptq", True),
    ],
)
def test_gptq_decode_matches_float64(bits, group_size, fmt, act_order):
    gen = torch.Generator().manual_seed(bits)
    parts, expected = gptq_layer(gen, 64, 32, bits, group_size, act_order=act_order)
    dec = GPTQDecoder(
        GPTQSettings(bits=bits, group_size=group_size, sym=False, desc_act=act_order, checkpoint_format=fmt)
    )
    out = dec.decode(
        "m.layers.0.mlp.down_proj.weight", named("m.layers.0.mlp.down_proj", parts), torch.float32
    )
    assert out.shape == (32, 64) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected(1 if fmt == "gptq" else 0), rtol=1e-6, atol=1e-7)
    assert (
        dec.decoded_nbytes(
            "m.layers.0.mlp.down_proj.weight",
            {f"m.layers.0.mlp.down_proj.{k}": tuple(v.shape) for k, v in parts.items()},
            torch.bfloat16,
        )
        == 32 * 64 * 2
    )


def test_gptq_passthrough_and_bit_identical_plain_tensors():
    dec = GPTQDecoder(GPTQSettings())
    norm = torch.randn(64, dtype=torch.bfloat16)
    assert dec.decode("model.norm.weight", {"model.norm.weight": norm}, torch.bfloat16) is norm
    assert dec.decode("model.norm.weight", {"model.norm.weight": norm}, torch.float32).dtype == torch.float32


def test_gptq_decode_many_batches_same_shapes():
    gen = torch.Generator().manual_seed(1)
    dec = GPTQDecoder(GPTQSettings(group_size=32, sym=False))
    names, parts_list, expected = [], [], []
    for e, (in_f, out_f) in enumerate([(64, 32), (64, 32), (32, 64), (64, 32)]):
        parts, exp = gptq_layer(gen, in_f, out_f)
        prefix = f"model.layers.0.mlp.experts.{e}.up_proj"
        names.append(f"{prefix}.weight")
        parts_list.append(named(prefix, parts))
        expected.append(exp(1))
    names.append("model.norm.weight")
    norm = torch.randn(8)
    parts_list.append({"model.norm.weight": norm})
    out = dec.decode_many(names, parts_list, torch.float32)
    for got, exp in zip(out[:4], expected, strict=True):
        torch.testing.assert_close(got.double(), exp, rtol=1e-6, atol=1e-7)
    assert out[4] is norm


def test_gptq_shape_errors_name_the_tensor():
    gen = torch.Generator().manual_seed(2)
    parts, _ = gptq_layer(gen, 64, 32)
    dec = GPTQDecoder(GPTQSettings(group_size=32))
    name = "model.layers.3.mlp.experts.0.down_proj.weight"
    bad = named("model.layers.3.mlp.experts.0.down_proj", {**parts, "scales": parts["scales"][:, :16]})
    with pytest.raises(EnhancedError) as err:
        dec.decode(name, bad, torch.float16)
    assert err.value.culprit == name
    for part in ("qweight: (8, 32)", "qzeros: (2, 4)", "scales: (2, 16)", "g_idx: (64,)"):
        assert part in str(err.value)
    wrong_groups = GPTQDecoder(GPTQSettings(group_size=16))
    no_gidx = {
        k: v
        for k, v in named("model.layers.3.mlp.experts.0.down_proj", parts).items()
        if not k.endswith("g_idx")
    }
    with pytest.raises(EnhancedError) as err:
        wrong_groups.decode(name, no_gidx, torch.float16)
    assert err.value.culprit == name and "group_size 16" in str(err.value)


def test_seed_reproducer_shapes_and_dimension_log(caplog):
    qweight = torch.randint(0, 16, (256, 768), dtype=torch.int32)
    qzeros = torch.randint(0, 16, (16, 96), dtype=torch.int32)
    scales = torch.randn(16, 768, dtype=torch.float16)
    with caplog.at_level(logging.DEBUG, logger="sglang.srt.enhanced.mixed_precision.formats.gptq"):
        weight = GPTQDequantizer.dequantize_gptq_weight(qweight, qzeros, scales)
    assert weight.shape == (768, 2048) and weight.dtype == torch.float16
    assert "in_features = 256 rows * 32 / 4 bits = 2048" in caplog.text
    # A group size that disagrees with the tensors is replaced by the one the shapes imply.
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="sglang.srt.enhanced.mixed_precision.formats.gptq"):
        again = GPTQDequantizer.dequantize_gptq_weight(qweight, qzeros, scales, group_size=64)
    assert torch.equal(again, weight)
    assert "derived 2048 input rows / 16 groups -> 128" in caplog.text


def test_seed_dequantizer_matches_float64():
    gen = torch.Generator().manual_seed(4)
    parts, expected = gptq_layer(gen, 128, 64, 4, 32)
    out = GPTQDequantizer.dequantize_gptq_weight(
        parts["qweight"], parts["qzeros"], parts["scales"], None, 4, 32, out_dtype=torch.float32
    )
    torch.testing.assert_close(out.double(), expected(1), rtol=1e-6, atol=1e-7)
    v2 = GPTQDequantizer.dequantize_gptq_weight(
        parts["qweight"],
        parts["qzeros"],
        parts["scales"],
        parts["g_idx"],
        checkpoint_format="gptq_v2",
        out_dtype=torch.float32,
    )
    torch.testing.assert_close(v2.double(), expected(0), rtol=1e-6, atol=1e-7)


def test_seed_detection_by_tensor_names():
    stored = {"m.q_proj.qweight": 0, "m.q_proj.qzeros": 0, "m.q_proj.scales": 0, "m.norm.weight": 0}
    assert is_gptq_weight(stored, "m.q_proj.weight") and is_gptq_weight(list(stored), "m.q_proj")
    assert not is_gptq_weight(stored, "m.norm.weight") and not is_gptq_weight(stored, "m.absent.weight")
    with pytest.raises(EnhancedError) as err:
        is_gptq_weight(["m.k_proj.qweight", "m.k_proj.scales"], "m.k_proj.weight")
    assert err.value.culprit == "m.k_proj.weight" and "m.k_proj.qzeros" in str(err.value)


def test_seed_detection_idiom_on_the_demo_gptq_release(demo_checkpoints):
    """The seed's ``if is_gptq_weight(...): dequantize_gptq_weight(...) else: weights[name]`` on real files."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    original = load_file(demo_checkpoints["bf16"] / "model.safetensors")
    quantized = 0
    with safe_open(str(demo_checkpoints["int4"] / "model.safetensors"), framework="pt") as weights:
        for weight_name, expected in original.items():
            if is_gptq_weight(weights, weight_name):
                quantized += 1
                prefix = weight_name.removesuffix(".weight")
                qweight, qzeros, scales, g_idx = (
                    weights.get_tensor(f"{prefix}.{part}") for part in ("qweight", "qzeros", "scales", "g_idx")
                )
                weight = GPTQDequantizer.dequantize_gptq_weight(
                    qweight, qzeros, scales, g_idx, 4, 32, out_dtype=torch.float32
                )
                # round to nearest: within half a quantization step of the bf16 original
                bound = scales.double()[g_idx.long()].t() / 2 + 1e-6 * (1 + expected.double().abs())
                assert ((weight.double() - expected.double()).abs() <= bound).all(), weight_name
            else:
                assert torch.equal(weights.get_tensor(weight_name), expected), weight_name
    assert quantized == 38  # 2 layers x (4 attention + 4 experts x 3 + 3 shared expert)


def test_v2_zeros_labelled_v1_are_detected_and_warned_once(caplog):
    gen = torch.Generator().manual_seed(5)
    dec = GPTQDecoder(
        GPTQSettings(bits=4, group_size=32, sym=True, checkpoint_format="gptq"), source="ckpt-A"
    )
    layers = [gptq_layer(gen, 64, 32, stored_zero=8) for _ in range(2)]
    with caplog.at_level(logging.WARNING):
        for i, (parts, expected) in enumerate(layers):
            out = dec.decode(f"l.{i}.weight", named(f"l.{i}", parts), torch.float32)
            torch.testing.assert_close(out.double(), expected(0), rtol=1e-6, atol=1e-7)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert (
        len(warnings) == 1 and "ckpt-A" in warnings[0].getMessage() and "gptq_v2" in warnings[0].getMessage()
    )

    caplog.clear()
    true_v1 = GPTQDecoder(GPTQSettings(bits=4, group_size=32, sym=True, checkpoint_format="gptq"))
    parts, expected = gptq_layer(gen, 64, 32, stored_zero=7)
    with caplog.at_level(logging.WARNING):
        out = true_v1.decode("l.weight", named("l", parts), torch.float32)
    torch.testing.assert_close(out.double(), expected(1), rtol=1e-6, atol=1e-7)
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


def test_three_bit_v2_zeros_labelled_v1_are_detected():
    gen = torch.Generator().manual_seed(6)
    dec = GPTQDecoder(GPTQSettings(bits=3, group_size=32, sym=True, checkpoint_format="gptq"))
    parts, expected = gptq_layer(gen, 64, 32, bits=3, stored_zero=4)
    out = dec.decode("l.weight", named("l", parts), torch.float32)
    torch.testing.assert_close(out.double(), expected(0), rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------------------
# plain and FP8


def test_plain_decoder_identity_and_cast():
    dec = PlainDecoder()
    assert dec.logical_names(["a.weight", "b.bias"]) == {"a.weight": ("a.weight",), "b.bias": ("b.bias",)}
    w = torch.randn(4, 4, dtype=torch.bfloat16)
    assert dec.decode("a.weight", {"a.weight": w}, torch.bfloat16) is w
    cast = dec.decode("a.weight", {"a.weight": w}, torch.float16)
    assert cast.dtype == torch.float16 and torch.equal(cast.float(), w.float())
    idx = torch.arange(4)
    assert dec.decode("a.idx", {"a.idx": idx}, torch.bfloat16) is idx
    assert dec.decoded_nbytes("a.weight", {"a.weight": (4, 4)}, torch.float32) == 64
    with pytest.raises(EnhancedError) as err:
        dec.decode("a.weight", {}, torch.float16)
    assert err.value.culprit == "a.weight"


def fp8(gen, m, n):
    return (torch.randn(m, n, generator=gen) * 50).clamp(-448, 448).to(torch.float8_e4m3fn)


def test_fp8_name_mapping():
    dec = FP8Decoder((128, 128))
    mapping = dec.logical_names(
        [
            "a.weight",
            "a.weight_scale_inv",
            "b.weight",
            "b.weight_scale",
            "b.input_scale",
            "norm.weight",
            "gate.weight",
        ]
    )
    assert mapping == {
        "a.weight": ("a.weight", "a.weight_scale_inv"),
        "b.weight": ("b.weight", "b.weight_scale"),
        "norm.weight": ("norm.weight",),
        "gate.weight": ("gate.weight",),
    }
    with pytest.raises(EnhancedError) as err:
        dec.logical_names(["c.weight_scale"])
    assert err.value.culprit == "c.weight_scale"


def test_fp8_block_decode_with_partial_edge_blocks():
    gen = torch.Generator().manual_seed(7)
    w = fp8(gen, 40, 70)
    s = torch.rand(3, 3, generator=gen) + 0.1  # blocks of 16 x 32: last row/col partial
    out = FP8Decoder((16, 32)).decode("x.weight", {"x.weight": w, "x.weight_scale_inv": s}, torch.float32)
    expected = torch.empty(40, 70, dtype=torch.float64)
    for i in range(40):
        for j in range(70):
            expected[i, j] = float(w[i, j].float()) * float(s[i // 16, j // 32])
    torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("shape", [(), (1,), (24,), (24, 1)])
def test_fp8_scaled_decode(shape):
    gen = torch.Generator().manual_seed(8)
    w = fp8(gen, 24, 40)
    s = torch.rand(shape, generator=gen) + 0.1
    out = FP8Decoder().decode("x.weight", {"x.weight": w, "x.weight_scale": s}, torch.float32)
    per_row = s.double().reshape(-1).expand(24) if s.numel() == 1 else s.double().reshape(24)
    torch.testing.assert_close(out.double(), w.double() * per_row[:, None], rtol=1e-6, atol=1e-7)


def test_fp8_errors_name_the_tensor():
    gen = torch.Generator().manual_seed(9)
    w = fp8(gen, 24, 40)
    with pytest.raises(EnhancedError) as err:
        FP8Decoder().decode(
            "x.weight", {"x.weight": w, "x.weight_scale_inv": torch.ones(1, 1)}, torch.float32
        )
    assert err.value.culprit == "x.weight" and "weight_block_size" in str(err.value)
    with pytest.raises(EnhancedError) as err:
        FP8Decoder((16, 16)).decode(
            "x.weight", {"x.weight": w, "x.weight_scale_inv": torch.ones(2, 2)}, torch.float32
        )
    assert err.value.culprit == "x.weight" and "(24, 40)" in str(err.value) and "(2, 2)" in str(err.value)
    with pytest.raises(EnhancedError) as err:
        FP8Decoder().decode("x.weight", {"x.weight": w, "x.weight_scale": torch.ones(40)}, torch.float32)
    assert err.value.culprit == "x.weight"
    unscaled = torch.randn(3, dtype=torch.bfloat16)
    assert FP8Decoder().decode("n.weight", {"n.weight": unscaled}, torch.bfloat16) is unscaled


def test_gptq_shapes_are_checked_from_shapes_alone():
    """decoded_nbytes (used when the plan is built) refuses inconsistent parts, naming the weight."""
    dec = GPTQDecoder(GPTQSettings(bits=4, group_size=32))
    name = "model.layers.0.mlp.experts.1.down_proj.weight"
    good = {"model.layers.0.mlp.experts.1.down_proj.qweight": (8, 48),
            "model.layers.0.mlp.experts.1.down_proj.qzeros": (2, 6),
            "model.layers.0.mlp.experts.1.down_proj.scales": (2, 48)}
    assert dec.decoded_nbytes(name, good, torch.bfloat16) == 64 * 48 * 2
    act_order = {**good, "model.layers.0.mlp.experts.1.down_proj.g_idx": (64,)}
    assert dec.decoded_nbytes(name, act_order, torch.float32) == 64 * 48 * 4
    for key, shape in (("scales", (2, 24)), ("qzeros", (3, 6)), ("g_idx", (63,))):
        bad = {**act_order, f"model.layers.0.mlp.experts.1.down_proj.{key}": shape}
        with pytest.raises(EnhancedError) as info:
            dec.decoded_nbytes(name, bad, torch.bfloat16)
        assert info.value.culprit == name



def test_seed_detection_readme_example_runs_as_written(demo_checkpoints, monkeypatch):
    from readme_blocks import code_block
    from safetensors.torch import load_file

    monkeypatch.chdir(Path(__file__).resolve().parents[2])  # the example reads demo/ from the repository root
    namespace: dict = {}
    exec(compile(code_block("Detection: `is_gptq_weight", "python"), "README_ENHANCED_FEATURES.md", "exec"), namespace)
    expected = load_file(demo_checkpoints["bf16"] / "model.safetensors")[namespace["weight_name"]]
    packed = load_file(demo_checkpoints["int4"] / "model.safetensors")
    scales = packed[namespace["prefix"] + ".scales"].double()
    assert namespace["weight"].shape == expected.shape == (32, 64)
    bound = scales.repeat_interleave(32, dim=0).t() / 2 + 1e-2 * expected.double().abs()  # RTN, then bf16
    assert ((namespace["weight"].double() - expected.double()).abs() <= bound).all()


def test_fp8_bad_scale_is_refused_from_shapes_alone() -> None:
    """``decoded_nbytes`` (what the plan calls) runs the decode-time FP8 check on shapes."""
    block = FP8Decoder((16, 16))
    good = {"x.weight": (48, 32), "x.weight_scale_inv": (3, 2)}
    assert block.decoded_nbytes("x.weight", good, torch.bfloat16) == 48 * 32 * 2
    with pytest.raises(EnhancedError, match=r"block scales must be \[3, 2\]") as err:
        block.decoded_nbytes("x.weight", {"x.weight": (48, 32), "x.weight_scale_inv": (2, 2)}, torch.bfloat16)
    assert err.value.culprit == "x.weight"
    with pytest.raises(EnhancedError, match="no weight_block_size"):
        FP8Decoder().decoded_nbytes("x.weight", good, torch.bfloat16)
    with pytest.raises(EnhancedError, match=r"weight_scale must be a scalar"):
        FP8Decoder().decoded_nbytes("x.weight", {"x.weight": (48, 32), "x.weight_scale": (40,)}, torch.bfloat16)
    assert FP8Decoder().decoded_nbytes("x.weight", {"x.weight": (48, 32), "x.weight_scale": (48, 1)},
                                       torch.float32) == 48 * 32 * 4
