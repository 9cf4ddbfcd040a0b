"""The configuration file: the seed format, path resolution, defaults, and errors naming the culprit."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from sglang.srt.enhanced.config import EnhancedConfig, Precision
from sglang.srt.enhanced.errors import EnhancedError

SEED_CONFIG = """\
mixed_precision:
  # paths of the weights of each precision
  fp16_path: "/path/to/fp16/weights"
  fp8_path: "/path/to/fp8/weights"
  int4_path: "/path/to/int4/weights"

  # weight mapping
  weight_mapping:
    # attention layers in FP16
    "model.layers.0.self_attn.q_proj.weight": "fp16"
    "model.layers.0.self_attn.k_proj.weight": "fp16"
    "model.layers.0.self_attn.v_proj.weight": "fp16"
    "model.layers.0.self_attn.o_proj.weight": "fp16"

    # MLP layers in FP8
    "model.layers.0.mlp.gate_proj.weight": "fp8"
    "model.layers.0.mlp.up_proj.weight": "fp8"
    "model.layers.0.mlp.down_proj.weight": "fp8"

    # expert layers in Int4
    "model.layers.0.mlp.experts.0.gate_proj.weight": "int4"
    "model.layers.0.mlp.experts.0.up_proj.weight": "int4"
    "model.layers.0.mlp.experts.0.down_proj.weight": "int4"

inference:
  max_seq_length: 4096
  max_batch_size: 32
  dtype: "bfloat16"
  device_map: "auto"

server:
  host: "127.0.0.1"
  port: 8080
  max_workers: 4
"""


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_seed_config_is_accepted_verbatim(tmp_path: Path) -> None:
    config = EnhancedConfig.from_yaml(write(tmp_path, SEED_CONFIG))
    mp = config.mixed_precision
    assert mp.fp16_path == Path("/path/to/fp16/weights")
    assert mp.fp8_path == Path("/path/to/fp8/weights")
    assert mp.int4_path == Path("/path/to/int4/weights")
    assert mp.bf16_path is None and mp.default is None
    assert len(mp.weight_mapping) == 10
    assert mp.weight_mapping["model.layers.0.self_attn.q_proj.weight"] is Precision.FP16
    assert mp.weight_mapping["model.layers.0.mlp.up_proj.weight"] is Precision.FP8
    assert mp.weight_mapping["model.layers.0.mlp.experts.0.down_proj.weight"] is Precision.INT4
    assert list(mp.weight_mapping)[0] == "model.layers.0.self_attn.q_proj.weight"
    inf, srv = config.inference, config.server
    assert (inf.max_seq_length, inf.max_batch_size, inf.dtype, inf.device_map) == (
        4096,
        32,
        "bfloat16",
        "auto",
    )
    assert (srv.host, srv.port, srv.max_workers) == ("127.0.0.1", 8080, 4)
    assert inf.unknown_keys == {} and srv.unknown_keys == {}
    assert config.default_precision is Precision.FP16
    assert config.used_precisions() == [Precision.FP16, Precision.FP8, Precision.INT4]
    assert config.source_paths() == {
        Precision.FP16: Path("/path/to/fp16/weights"),
        Precision.FP8: Path("/path/to/fp8/weights"),
        Precision.INT4: Path("/path/to/int4/weights"),
    }
    assert config.config_file == tmp_path / "config.yaml"


def test_relative_paths_resolve_against_the_config_folder(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "mixed_precision:\n  bf16_path: weights/bf16\n  int4_path: ../gptq\n  fp8_path: /abs/fp8\n"
        "  weight_mapping: {'a.weight': int4, 'b.weight': fp8}\n",
        name="conf/config.yaml",
    )
    config = EnhancedConfig.from_yaml(path)
    assert config.mixed_precision.bf16_path == tmp_path / "conf" / "weights" / "bf16"
    assert config.mixed_precision.int4_path == tmp_path / "conf" / ".." / "gptq"
    assert config.mixed_precision.fp8_path == Path("/abs/fp8")
    assert config.default_precision is Precision.BF16


def test_model_path_serves_unquantized_precisions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    path = write(tmp_path, "mixed_precision:\n  int4_path: q\n  weight_mapping: {'x.weight': fp16}\n")
    config = EnhancedConfig.from_yaml(path, model_path="model")
    assert config.model_path == tmp_path / "model"
    assert config.source_path(Precision.FP16) == tmp_path / "model"
    assert config.source_path(Precision.BF16) == tmp_path / "model"
    assert config.source_path(Precision.FP8) is None
    # No default and no explicit unquantized folder: labelled by the serving dtype (bfloat16).
    assert config.default_precision is Precision.BF16
    assert config.source_paths() == {
        Precision.FP16: tmp_path / "model",
        Precision.BF16: tmp_path / "model",
    }


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [
        ("float16", Precision.FP16),
        ("half", Precision.FP16),
        ("bfloat16", Precision.BF16),
        ("float32", Precision.FP32),
        ("auto", Precision.BF16),
    ],
)
def test_default_precision_follows_serving_dtype(dtype: str, expected: Precision) -> None:
    config = EnhancedConfig.from_mapping({"inference": {"dtype": dtype}}, model_path="/m")
    assert config.default_precision is expected


def test_explicit_default_and_case_insensitive_precisions(tmp_path: Path) -> None:
    config = EnhancedConfig.from_mapping(
        {"mixed_precision": {"int4_path": "/q", "default": "INT4", "weight_mapping": {"x.weight": " BF16 "}}},
        model_path="/m",
    )
    assert config.default_precision is Precision.INT4
    assert config.mixed_precision.weight_mapping == {"x.weight": Precision.BF16}
    assert config.used_precisions() == [Precision.BF16, Precision.INT4]


def test_empty_sections_and_no_mapping() -> None:
    config = EnhancedConfig.from_mapping({"mixed_precision": None, "server": None}, model_path="/m")
    assert config.mixed_precision.weight_mapping == {}
    assert config.server.port == 8080
    assert config.inference.torch_dtype().is_floating_point


def test_unknown_inference_and_server_keys_are_kept_by_name(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        SEED_CONFIG.replace('  device_map: "auto"\n', '  device_map: "auto"\n  temperature: 0.7\n')
        + "  timeout: 30\n  unknown_keys: 1\n",
    )
    config = EnhancedConfig.from_yaml(path)
    assert config.inference.unknown_keys == {"temperature": 0.7}
    assert config.server.unknown_keys == {"timeout": 30, "unknown_keys": 1}
    assert config.server.port == 8080


def test_config_is_frozen() -> None:
    config = EnhancedConfig.from_mapping({}, model_path="/m")
    with pytest.raises(ValidationError):
        config.server = None  # type: ignore[assignment]
    with pytest.raises(ValidationError):
        config.inference.dtype = "float32"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("text", "culprit", "message"),
    [
        (
            "mixed_precision:\n  weight_mapping:\n    'model.x.weight': int5\n",
            'mixed_precision.weight_mapping["model.x.weight"]',
            "unknown precision 'int5'",
        ),
        ("mixed_precision:\n  default: fp4\n", "mixed_precision.default", "unknown precision 'fp4'"),
        ("mixed_precision:\n  fp8_pth: /x\n", "mixed_precision.fp8_pth", "unknown key"),
        ("mixed_precison:\n  fp8_path: /x\n", "mixed_precison", "unknown section"),
        ("mixed_precision:\n  weight_mapping: [a, b]\n", "mixed_precision.weight_mapping", "dictionary"),
        ("mixed_precision:\n  int4_path: 7\n", "mixed_precision.int4_path", "folder path"),
        ("server:\n  port: http\n", "server.port", "integer"),
        ("server:\n  port: 70000\n", "server.port", "65535"),
        ("inference:\n  max_batch_size: 0\n", "inference.max_batch_size", "greater than 0"),
        ("inference:\n  dtype: int8\n", "inference.dtype", "unknown dtype 'int8'"),
        ("inference: 5\n", "inference", "dictionary"),
        ("- a\n- b\n", "<root>", "mapping at the top level"),
        (
            "mixed_precision:\n  int4_path: /q\n  weight_mapping:\n    're:model\\.(': int4\n",
            'mixed_precision.weight_mapping["re:model\\.("]',
            "invalid regular expression",
        ),
        (
            "mixed_precision:\n  weight_mapping:\n    'a.weight': int4\n",
            'mixed_precision.weight_mapping["a.weight"]',
            "mixed_precision.int4_path is not set",
        ),
        ("mixed_precision:\n  default: fp8\n", "mixed_precision.default", "set mixed_precision.fp8_path"),
    ],
)
def test_bad_config_names_the_culprit(tmp_path: Path, text: str, culprit: str, message: str) -> None:
    with pytest.raises(EnhancedError) as info:
        EnhancedConfig.from_yaml(write(tmp_path, text), model_path="/m")
    assert info.value.culprit == culprit
    assert message in info.value.msg


def test_unquantized_precision_without_any_folder(tmp_path: Path) -> None:
    with pytest.raises(EnhancedError) as info:
        EnhancedConfig.from_yaml(write(tmp_path, "mixed_precision:\n  weight_mapping: {'a.weight': bf16}\n"))
    assert info.value.culprit == 'mixed_precision.weight_mapping["a.weight"]'
    assert "no model folder" in info.value.msg


def test_yaml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "mixed_precision:\n  weight_mapping:\n    'a': fp16\n   - broken\n")
    with pytest.raises(EnhancedError) as info:
        EnhancedConfig.from_yaml(path)
    assert str(info.value.culprit).startswith(f"{path}:4:")
    assert "invalid YAML" in info.value.msg


def test_duplicate_yaml_key_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, "mixed_precision:\n  weight_mapping:\n    'a.weight': fp16\n    'a.weight': fp8\n")
    with pytest.raises(EnhancedError) as info:
        EnhancedConfig.from_yaml(path, model_path="/m")
    assert "duplicate key 'a.weight'" in info.value.msg
    assert str(info.value.culprit).startswith(f"{path}:4:")


def test_missing_and_empty_files(tmp_path: Path) -> None:
    with pytest.raises(EnhancedError) as info:
        EnhancedConfig.from_yaml(tmp_path / "nope.yaml")
    assert info.value.culprit == str(tmp_path / "nope.yaml")
    with pytest.raises(EnhancedError, match="empty") as info:
        EnhancedConfig.from_yaml(write(tmp_path, "# only a comment\n"))
    assert info.value.culprit == str(tmp_path / "config.yaml")


def test_several_problems_are_counted(tmp_path: Path) -> None:
    with pytest.raises(EnhancedError) as info:
        EnhancedConfig.from_yaml(write(tmp_path, "server:\n  port: x\n  max_workers: y\n"))
    assert info.value.culprit == "server.port"
    assert "(and 1 more problem)" in info.value.msg
