"""The quantize tool: a tiny bf16 checkpoint quantized, decoded back, and checked against bounds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from sglang.srt.enhanced.errors import EnhancedError
from sglang.srt.enhanced.mixed_precision.decoders.fp8 import FP8Decoder
from sglang.srt.enhanced.mixed_precision.decoders.gptq import GPTQDecoder
from sglang.srt.enhanced.mixed_precision.decoders.registry import decoder_for_checkpoint
from sglang.srt.enhanced.tools.quantize import main, quantize_checkpoint

ROUTERS = ("mlp.gate.weight", "mlp.shared_expert_gate.weight")


@pytest.fixture(scope="module")
def src(tiny_model_factory) -> Path:
    return tiny_model_factory("qwen2_moe")


def load_all(folder: Path) -> dict[str, torch.Tensor]:
    index = folder / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values()))
        if index.is_file()
        else ["model.safetensors"]
    )
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(folder / f))
    return out


def decode_all(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], object]:
    dec = decoder_for_checkpoint(folder)
    stored = load_all(folder)
    mapping = dec.logical_names(stored)
    decoded = {
        name: dec.decode(name, {p: stored[p] for p in parts}, torch.float32)
        for name, parts in mapping.items()
    }
    return decoded, stored, dec


def is_expected_quantized(name: str, tensor: torch.Tensor) -> bool:
    return ".layers." in name and tensor.dim() == 2 and not name.endswith(ROUTERS)


@pytest.mark.parametrize(
    "opts",
    [
        dict(bits=4, group_size=32, sym=False, desc_act=True, checkpoint_format="gptq"),
        dict(bits=4, group_size=128, sym=True, desc_act=False, checkpoint_format="gptq"),
        dict(bits=8, group_size=-1, sym=True, desc_act=False, checkpoint_format="gptq_v2"),
        dict(bits=3, group_size=32, sym=False, desc_act=False, checkpoint_format="gptq_v2"),
        dict(bits=2, group_size=16, sym=False, desc_act=True, checkpoint_format="gptq_v2"),
    ],
)
def test_gptq_round_trip_within_rtn_bound(src, tmp_path, opts):
    dst = quantize_checkpoint(src, tmp_path / "q", "gptq", **opts)
    original = load_file(src / "model.safetensors")
    decoded, stored, dec = decode_all(dst)
    assert isinstance(dec, GPTQDecoder)
    assert dec.settings.bits == opts["bits"] and dec.settings.checkpoint_format == opts["checkpoint_format"]
    assert set(decoded) == set(original)
    n_quantized = 0
    for name, w in original.items():
        prefix = name.removesuffix(".weight")
        if not is_expected_quantized(name, w):
            assert name in stored and torch.equal(stored[name], w), name
            continue
        n_quantized += 1
        assert name not in stored and stored[f"{prefix}.qweight"].dtype == torch.int32
        scales = stored[f"{prefix}.scales"].double()  # [groups, out]
        g_idx = stored[f"{prefix}.g_idx"].long()  # [in]
        bound = scales[g_idx].t() / 2 + 1e-6 * (1 + w.double().abs())  # [out, in]
        err = (decoded[name].double() - w.double()).abs()
        assert (err <= bound).all(), (name, float((err - bound).max()))
    assert n_quantized == 38  # 2 layers x (4 attention + 4 experts x 3 + 3 shared expert)


def test_gptq_files_and_configs(src, tmp_path):
    dst = quantize_checkpoint(src, tmp_path / "q", "gptq", bits=4, group_size=32, desc_act=True)
    qc = json.loads((dst / "quantize_config.json").read_text())
    assert qc == {**qc, "bits": 4, "group_size": 32, "desc_act": True, "sym": True, "checkpoint_format": "gptq",
                  "quant_method": "gptq"}  # fmt: skip
    config = json.loads((dst / "config.json").read_text())
    assert config["quantization_config"] == qc
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (dst / f).read_bytes() == (src / f).read_bytes()
    stored = load_file(dst / "model.safetensors")
    prefix = "model.layers.0.mlp.experts.2.down_proj"  # in = moe_intermediate 32, out = hidden 64
    assert stored[f"{prefix}.qweight"].shape == (4, 64)
    assert stored[f"{prefix}.qzeros"].shape == (1, 8)
    assert stored[f"{prefix}.scales"].shape == (1, 64) and stored[f"{prefix}.scales"].dtype == torch.float16
    g_idx = stored["model.layers.0.self_attn.q_proj.g_idx"]
    assert g_idx.dtype == torch.int32 and torch.bincount(g_idx.long()).tolist() == [32, 32]
    assert not torch.equal(g_idx, torch.arange(64, dtype=torch.int32) // 32)  # act-order really reorders


@pytest.mark.parametrize("fmt", ["fp8-block", "fp8-channel", "fp8-tensor"])
def test_fp8_round_trip_within_e4m3_bound(src, tmp_path, fmt):
    dst = quantize_checkpoint(src, tmp_path / "q", fmt, block_size=(32, 16))
    original = load_file(src / "model.safetensors")
    decoded, stored, dec = decode_all(dst)
    assert isinstance(dec, FP8Decoder)
    qc = json.loads((dst / "config.json").read_text())["quantization_config"]
    for name, w in original.items():
        prefix = name.removesuffix(".weight")
        if not is_expected_quantized(name, w):
            assert torch.equal(stored[name], w)
            continue
        assert stored[name].dtype == torch.float8_e4m3fn
        if fmt == "fp8-block":
            scale = stored[f"{prefix}.weight_scale_inv"]
            assert scale.shape == (-(-w.shape[0] // 32), -(-w.shape[1] // 16))
            full = scale.repeat_interleave(32, 0)[: w.shape[0]].repeat_interleave(16, 1)[:, : w.shape[1]]
        else:
            scale = stored[f"{prefix}.weight_scale"]
            assert scale.shape == ((w.shape[0], 1) if fmt == "fp8-channel" else ())
            full = scale.expand_as(w) if scale.dim() else scale.expand(w.shape)
        # e4m3: 3 mantissa bits (half-ulp 2^-4 relative), subnormal spacing 2^-9 of the scale.
        bound = 2.0**-4 * w.double().abs() + 2.0**-10 * full.double() + 1e-7
        assert ((decoded[name].double() - w.double()).abs() <= bound).all(), name
    if fmt == "fp8-block":
        assert qc == {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "activation_scheme": "dynamic",
            "weight_block_size": [32, 16],
        }
    else:
        weights = qc["config_groups"]["group_0"]["weights"]
        assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "float-quantized"
        assert weights["type"] == "float" and weights["num_bits"] == 8
        assert weights["strategy"] == ("channel" if fmt == "fp8-channel" else "tensor")
        assert "lm_head" in qc["ignore"] and "model.layers.0.mlp.gate" in qc["ignore"]


def test_sharding_and_determinism(src, tmp_path):
    a = quantize_checkpoint(src, tmp_path / "a", "gptq", group_size=32, max_shard_size="100KB")
    b = quantize_checkpoint(src, tmp_path / "b", "gptq", group_size=32, max_shard_size="100KB")
    index = json.loads((a / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and not (a / "model.safetensors").exists()
    names = set()
    for shard in shards:
        with safe_open(str(a / shard), framework="pt") as f:
            names |= {n for n in f.keys() if index["weight_map"][n] == shard}
        assert (a / shard).read_bytes() == (b / shard).read_bytes()
    assert names == set(index["weight_map"])
    single = quantize_checkpoint(src, tmp_path / "c", "gptq", group_size=32)
    assert set(load_file(single / "model.safetensors")) == names


def test_cli_help_and_errors(src, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0 and "--format" in capsys.readouterr().out
    main(
        [
            "--src",
            str(src),
            "--dst",
            str(tmp_path / "out"),
            "--format",
            "fp8-block",
            "--block-size",
            "32",
            "32",
        ]
    )
    assert (tmp_path / "out" / "model.safetensors").is_file()
    with pytest.raises(SystemExit) as exit_info:  # destination not empty
        main(["--src", str(src), "--dst", str(tmp_path / "out"), "--format", "gptq"])
    assert exit_info.value.code == 2
    with pytest.raises(EnhancedError) as err:
        quantize_checkpoint(src, tmp_path / "x", "int3")
    assert "gptq" in str(err.value) and err.value.culprit == "format"
    with pytest.raises(EnhancedError) as err:
        quantize_checkpoint(tmp_path / "out", tmp_path / "y", "gptq")
    assert "already quantized" in str(err.value)
