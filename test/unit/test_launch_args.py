"""Launcher argument handling: --model alias, YAML sections onto server arguments, CPU defaults."""

from __future__ import annotations

import logging

import pytest
import yaml

from sglang.srt.enhanced.config import EnhancedConfig
from sglang.srt.enhanced.launch import (
    apply_config_sections,
    build_parser,
    explicit_dests,
    resolve_device,
    rewrite_model_alias,
)


def parse(argv: list[str]):
    argv = rewrite_model_alias(argv)
    parser = build_parser()
    return parser.parse_args(argv), explicit_dests(parser, argv)


def config(tmp_path, inference: dict, server: dict) -> EnhancedConfig:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({"mixed_precision": {}, "inference": inference, "server": server}))
    return EnhancedConfig.from_yaml(path, model_path=tmp_path)


def test_model_alias_in_both_spellings():
    assert rewrite_model_alias(["--model", "m", "--port", "1"]) == ["--model-path", "m", "--port", "1"]
    assert rewrite_model_alias(["--model=m"]) == ["--model-path=m"]
    assert rewrite_model_alias(["--model-path", "m"]) == ["--model-path", "m"]
    args, _ = parse(["--model", "/some/model", "--enable-expert-tracking"])
    assert args.model_path == "/some/model" and args.enable_expert_tracking


def test_yaml_sections_fill_unset_arguments_and_command_line_wins(tmp_path, caplog):
    args, explicit = parse(["--model", str(tmp_path), "--port", "9001"])
    cfg = config(tmp_path, {"max_seq_length": 1024, "max_batch_size": 7, "dtype": "float16", "device_map": "auto"},
                 {"host": "0.0.0.0", "port": 8080, "max_workers": 3})
    with caplog.at_level(logging.WARNING):
        apply_config_sections(args, cfg, explicit)
    assert (args.context_length, args.max_running_requests, args.dtype) == (1024, 7, "float16")
    assert args.host == "0.0.0.0"
    assert args.port == 9001  # given on the command line
    warned = caplog.text
    assert "inference.device_map" in warned and "server.max_workers" in warned
    assert "max_seq_length" not in warned


def test_unknown_yaml_keys_are_warned_by_name(tmp_path, caplog):
    args, explicit = parse(["--model", str(tmp_path)])
    cfg = config(tmp_path, {"dtype": "bfloat16", "temperature_default": 0.3}, {"port": 8081})
    with caplog.at_level(logging.WARNING):
        apply_config_sections(args, cfg, explicit)
    assert "inference.temperature_default" in caplog.text
    assert args.port == 8081


@pytest.mark.parametrize("argv, expected_backend, expected_fraction", [
    ([], "torch_native", 0.5),
    (["--mem-fraction-static", "0.2"], "torch_native", 0.2),
])
def test_cpu_mode_defaults_yield_to_the_command_line(tmp_path, argv, expected_backend, expected_fraction):
    args, explicit = parse(["--model", str(tmp_path), "--device", "cpu", *argv])
    assert resolve_device(args, explicit) == "cpu"
    assert args.attention_backend == expected_backend
    assert args.disable_cuda_graph is True
    assert args.mem_fraction_static == expected_fraction
    assert args.max_total_tokens == 65536


def test_cpu_mode_with_tensor_parallelism(tmp_path, monkeypatch):
    monkeypatch.delenv("SGL_DISABLE_TP_MEMORY_INBALANCE_CHECK", raising=False)
    args, explicit = parse(["--model", str(tmp_path), "--device", "cpu", "--tp-size", "2"])
    assert resolve_device(args, explicit) == "cpu"
    assert args.disable_custom_all_reduce is True  # a CUDA kernel
    # Both ranks read one host's RAM: SGLang's balance check of free memory only warns.
    import os

    assert os.environ["SGL_DISABLE_TP_MEMORY_INBALANCE_CHECK"] == "true"
