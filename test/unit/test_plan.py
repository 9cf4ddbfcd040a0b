"""Load plans: rule ranking, ties, unmatched rules, weights missing from a checkpoint, byte totals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sglang.srt.enhanced.config import EnhancedConfig, Precision
from sglang.srt.enhanced.errors import EnhancedError
from sglang.srt.enhanced.mixed_precision.plan import (
    DEFAULT_RULE,
    build_plan,
    format_plan,
    glob_literal_count,
    regex_literal_count,
)
from sglang.srt.enhanced.mixed_precision.sources import open_sources

OUT, IN = 16, 32  # every linear weight is [16, 32]
LINEARS = [
    f"model.layers.{layer}.{module}.weight"
    for layer in range(2)
    for module in [
        "self_attn.q_proj",
        *(f"mlp.experts.{e}.{p}" for e in range(2) for p in ("gate_proj", "up_proj", "down_proj")),
        "mlp.shared_expert.down_proj",
    ]
]
OTHERS = {
    "model.embed_tokens.weight": (10, IN),
    "model.layers.0.mlp.gate.weight": (2, IN),
    "model.layers.1.mlp.gate.weight": (2, IN),
    "model.norm.weight": (IN,),
    "lm_head.weight": (10, IN),
}
ALL_WEIGHTS = sorted([*LINEARS, *OTHERS])


def write_plain(folder: Path) -> None:
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    shapes = {**dict.fromkeys(LINEARS, (OUT, IN)), **OTHERS}
    save_file(
        {n: torch.randn(*s, generator=g).to(torch.bfloat16) for n, s in shapes.items()},
        str(folder / "model.safetensors"),
    )


def write_gptq(folder: Path, skip: str | None = None) -> None:
    """A 4-bit, group-size-16 GPTQ checkpoint of the same model (random codes); ``skip`` is left out."""
    folder.mkdir()
    g = torch.Generator().manual_seed(1)
    out: dict[str, torch.Tensor] = {}
    for name in LINEARS:
        if name == skip:
            continue
        prefix = name.removesuffix(".weight")
        out[f"{prefix}.qweight"] = torch.randint(0, 2**31 - 1, (IN // 8, OUT), generator=g, dtype=torch.int32)
        out[f"{prefix}.qzeros"] = torch.randint(
            0, 2**31 - 1, (IN // 16, OUT // 8), generator=g, dtype=torch.int32
        )
        out[f"{prefix}.scales"] = torch.rand(IN // 16, OUT, generator=g).to(torch.float16)
    for name, shape in OTHERS.items():
        out[name] = torch.randn(*shape, generator=g).to(torch.float16)
    save_file(out, str(folder / "model.safetensors"))
    (folder / "quantize_config.json").write_text(json.dumps({"bits": 4, "group_size": 16, "sym": True}))


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("plan")
    write_plain(root / "plain")
    write_gptq(root / "gptq")
    write_gptq(root / "gptq_missing", skip="model.layers.1.mlp.experts.1.down_proj.weight")
    return {"plain": root / "plain", "gptq": root / "gptq", "gptq_missing": root / "gptq_missing"}


def make_plan(folders: dict[str, Path], mapping: dict[str, str], *, gptq: str = "gptq", **kw: object):
    """Plan with fp16/bf16/fp32/fp8 all reading the plain folder and int4 the GPTQ one."""
    section = {"fp8_path": str(folders["plain"]), "int4_path": str(folders[gptq]), "weight_mapping": mapping}
    config = EnhancedConfig.from_mapping({"mixed_precision": section}, model_path=folders["plain"])
    return build_plan(config, open_sources(config), **kw)


def test_literal_counts() -> None:
    assert glob_literal_count("model.layers.*.mlp.experts.*") == 26
    assert glob_literal_count("a[bc]d?e*") == 3
    assert glob_literal_count("a[b") == 3  # unclosed bracket is literal
    assert regex_literal_count(r"model\.layers\.\d+\.mlp\.(gate|up|down)_proj\.weight") == 30
    assert regex_literal_count(r"ab*c") == 2
    assert regex_literal_count(r"ab{2}c?") == 1  # quantified atoms count nothing
    assert regex_literal_count(r"abc|de") == 2
    assert regex_literal_count(r"[abc]x\w\.") == 2
    assert regex_literal_count(r"a+.") == 1


def test_unmapped_weights_take_the_default(folders: dict[str, Path]) -> None:
    plan = make_plan(folders, {})
    assert sorted(plan.names) == ALL_WEIGHTS
    assert {e.precision for e in plan} == {Precision.BF16}
    assert {e.rule for e in plan} == {DEFAULT_RULE}
    assert plan.entry("lm_head.weight").stored_parts == ("lm_head.weight",)


def test_exact_name_beats_any_pattern(folders: dict[str, Path]) -> None:
    q0 = "model.layers.0.self_attn.q_proj.weight"
    plan = make_plan(
        folders,
        {
            "model.layers.*": "fp8",
            r"re:model\.layers\.0\.self_attn\.q_proj\.weight": "fp32",
            q0: "fp16",
        },
    )
    assert (plan.entry(q0).precision, plan.entry(q0).rule) == (Precision.FP16, q0)
    q1 = plan.entry("model.layers.1.self_attn.q_proj.weight")
    assert (q1.precision, q1.rule) == (Precision.FP8, "model.layers.*")
    assert plan.entry("model.norm.weight").rule == DEFAULT_RULE


def test_more_literal_characters_win(folders: dict[str, Path]) -> None:
    experts_glob = "model.layers.*.mlp.experts.*"  # 26 literals
    expert1_regex = r"re:model\.layers\.\d+\.mlp\.experts\.1\..*"  # 28 literals
    plan = make_plan(folders, {"model.layers.*": "fp8", experts_glob: "int4", expert1_regex: "fp32"})
    e0 = plan.entry("model.layers.1.mlp.experts.0.up_proj.weight")
    e1 = plan.entry("model.layers.1.mlp.experts.1.up_proj.weight")
    assert (e0.precision, e0.rule) == (Precision.INT4, experts_glob)
    assert (e1.precision, e1.rule) == (Precision.FP32, expert1_regex)
    assert plan.entry("model.layers.0.mlp.gate.weight").precision is Precision.FP8
    assert plan.entry("model.embed_tokens.weight").precision is Precision.BF16


def test_glob_beats_regex_at_equal_literal_count(folders: dict[str, Path]) -> None:
    plan = make_plan(folders, {r"re:model\.layers\.0\..*": "fp32", "model.layers.0.*": "fp8"})
    entry = plan.entry("model.layers.0.mlp.gate.weight")
    assert (entry.precision, entry.rule) == (Precision.FP8, "model.layers.0.*")


def test_equal_rank_with_different_precisions_is_an_error(folders: dict[str, Path]) -> None:
    with pytest.raises(EnhancedError) as info:
        make_plan(folders, {"model.layers.1*": "fp8", "model.layers.?.*": "fp32"})  # 14 literals each
    assert str(info.value.culprit).startswith("model.layers.1.")
    assert "'model.layers.1*' (fp8)" in info.value.msg and "'model.layers.?.*' (fp32)" in info.value.msg


def test_equal_rank_with_same_precision_records_the_first_rule(folders: dict[str, Path]) -> None:
    plan = make_plan(folders, {"model.layers.1*": "fp8", "model.layers.?.*": "fp8"})
    assert plan.entry("model.layers.1.mlp.gate.weight").rule == "model.layers.1*"
    assert plan.entry("model.layers.0.mlp.gate.weight").rule == "model.layers.?.*"


@pytest.mark.parametrize(
    ("key", "hint"),
    [
        ("model.layers.0.self_attn.q_prj.weight", "did you mean 'model.layers.0.self_attn.q_proj.weight'"),
        ("model.layers.*.mlp.gate_proj.weight", "matches no weight"),
        (r"re:model\.layers\.\d+\.mlp\.up_proj\.weight", "matches no weight"),
    ],
)
def test_rule_matching_no_weight_is_an_error(folders: dict[str, Path], key: str, hint: str) -> None:
    with pytest.raises(EnhancedError) as info:
        make_plan(folders, {"model.layers.*.mlp.experts.*": "int4", key: "fp8"})
    assert info.value.culprit == f'mixed_precision.weight_mapping["{key}"]'
    assert hint in info.value.msg


def test_weight_missing_from_its_checkpoint(folders: dict[str, Path]) -> None:
    with pytest.raises(EnhancedError) as info:
        make_plan(folders, {"model.layers.*.mlp.experts.*": "int4"}, gptq="gptq_missing")
    assert info.value.culprit == "model.layers.1.mlp.experts.1.down_proj.weight"
    assert str(folders["gptq_missing"]) in info.value.msg and "int4" in info.value.msg


def test_unmapped_weight_without_default_is_an_error(folders: dict[str, Path]) -> None:
    config = EnhancedConfig.from_mapping(
        {"mixed_precision": {"int4_path": str(folders["gptq"]), "weight_mapping": {"model.layers.*": "int4"}}}
    )
    assert config.default_precision is None
    with pytest.raises(EnhancedError) as info:
        build_plan(config, open_sources(config))
    assert info.value.culprit in {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    assert "mixed_precision.default" in info.value.msg


def test_int4_only_plan_reads_names_from_the_gptq_checkpoint(folders: dict[str, Path]) -> None:
    config = EnhancedConfig.from_mapping(
        {"mixed_precision": {"int4_path": str(folders["gptq"]), "default": "int4"}}
    )
    plan = build_plan(config, open_sources(config))
    assert sorted(plan.names) == ALL_WEIGHTS
    prefix = "model.layers.0.self_attn.q_proj"
    assert plan.entry(f"{prefix}.weight").stored_parts == (
        f"{prefix}.qweight",
        f"{prefix}.qzeros",
        f"{prefix}.scales",
    )


def test_summary_bytes(folders: dict[str, Path]) -> None:
    plan = make_plan(folders, {"model.layers.*.mlp.experts.*": "int4"})
    summary = plan.summary()
    assert list(summary) == [Precision.BF16, Precision.INT4]
    # 12 expert weights: qweight [4, 16] int32 (256 B) + qzeros [2, 2] int32 (16 B) + scales [2, 16] fp16 (64 B);
    # decoded to bf16 [16, 32]: 1024 B.
    assert (summary[Precision.INT4].tensors, summary[Precision.INT4].bytes_on_disk) == (12, 12 * 336)
    assert summary[Precision.INT4].bytes_loaded == 12 * 1024
    # 9 bf16 weights: embed/lm_head 10x32 (640 B each), 2 q_proj + 2 shared_expert 16x32 (1024 B each),
    # 2 router gates 2x32 (128 B each), norm 32 (64 B).
    bf16_bytes = 2 * 640 + 4 * 1024 + 2 * 128 + 64
    assert (summary[Precision.BF16].tensors, summary[Precision.BF16].bytes_on_disk) == (9, bf16_bytes)
    assert summary[Precision.BF16].bytes_loaded == bf16_bytes
    assert plan.total().tensors == 21

    wide = make_plan(folders, {"model.layers.*.mlp.experts.*": "int4"}, dtype=torch.float32)
    assert wide.summary()[Precision.INT4].bytes_loaded == 12 * 2048
    assert wide.summary()[Precision.BF16].bytes_loaded == 2 * bf16_bytes
    assert wide.summary()[Precision.BF16].bytes_on_disk == bf16_bytes


def test_given_model_weights_restrict_the_plan(folders: dict[str, Path]) -> None:
    names = ["lm_head.weight", "model.layers.0.mlp.experts.1.up_proj.weight"]
    plan = make_plan(folders, {"model.layers.*.mlp.experts.*": "int4"}, model_weights=names)
    assert plan.names == tuple(names)
    assert [e.precision for e in plan] == [Precision.BF16, Precision.INT4]


def test_format_plan(folders: dict[str, Path]) -> None:
    plan = make_plan(folders, {"model.layers.*.mlp.experts.*": "int4"})
    text = format_plan(plan)
    lines = text.splitlines()
    assert lines[0] == "Load plan: 21 weights, decoded to bfloat16"
    int4_row = next(line for line in lines if line.startswith("int4 "))
    assert str(folders["gptq"]) in int4_row and int4_row.split()[-5:] == ["12", "3.94", "KiB", "12.00", "KiB"]
    rule_row = next(line for line in lines if line.startswith("model.layers.*.mlp.experts.*"))
    assert rule_row.split()[1:3] == ["int4", "12"]
    assert any(line.startswith(f"{DEFAULT_RULE} ") and " bf16 " in line for line in lines)
    assert "model.norm.weight" not in text
    detailed = format_plan(plan, per_tensor=True)
    norm_row = next(line for line in detailed.splitlines() if line.startswith("model.norm.weight"))
    assert norm_row.split() == ["model.norm.weight", "bf16", DEFAULT_RULE, "64", "B", "64", "B"]
