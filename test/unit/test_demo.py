"""The demo builder: deterministic, idempotent, and the formats the shipped config expects."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from safetensors import safe_open

from sglang.srt.enhanced.tools.demo import MARKER, build_demo


def _digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != ".demo.lock"
    }


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    out = tmp_path_factory.mktemp("demo")
    return out, build_demo(out)


def test_layout_and_formats(built) -> None:
    out, paths = built
    assert paths == {"bf16": out / "bf16", "fp8": out / "fp8", "int4": out / "gptq-int4"}
    gptq = json.loads((paths["int4"] / "quantize_config.json").read_text())
    assert (gptq["bits"], gptq["group_size"], gptq["sym"], gptq["desc_act"]) == (4, 32, True, False)
    fp8 = json.loads((paths["fp8"] / "config.json").read_text())["quantization_config"]
    assert (fp8["quant_method"], fp8["weight_block_size"]) == ("fp8", [32, 32])
    assert "quantization_config" not in json.loads((paths["bf16"] / "config.json").read_text())
    with safe_open(str(paths["int4"] / "model.safetensors"), "pt") as f:
        # [in/8, out] packed int32 for an expert's down_proj (in = moe_intermediate 32, out = hidden 64)
        assert f.get_slice("model.layers.0.mlp.experts.0.down_proj.qweight").get_shape() == [4, 64]
        assert f.get_slice("model.layers.0.mlp.experts.0.down_proj.scales").get_shape() == [1, 64]


def test_second_call_leaves_a_complete_build_alone(built) -> None:
    out, _ = built
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != ".demo.lock"}
    build_demo(out)
    after = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != ".demo.lock"}
    assert after == before


def test_rebuild_is_byte_identical(built, tmp_path: Path) -> None:
    out, _ = built
    other = tmp_path / "again"
    paths = build_demo(other)
    assert _digests(other) == _digests(out)
    stamp = (paths["int4"] / "model.safetensors").stat().st_mtime_ns
    build_demo(other, force=True)
    assert (paths["int4"] / "model.safetensors").stat().st_mtime_ns != stamp
    assert _digests(other) == _digests(out)


def test_incomplete_build_is_redone(built, tmp_path: Path) -> None:
    out, _ = built
    partial = tmp_path / "partial"
    (partial / "fp8").mkdir(parents=True)
    (partial / "fp8" / "stale.txt").write_text("left over from an interrupted build")
    build_demo(partial)
    assert (partial / MARKER).is_file()
    assert _digests(partial) == _digests(out)
