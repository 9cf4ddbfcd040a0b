"""What the launcher refuses before anything starts: ``--plan`` runs every check a start runs.

Each case damages a copy of the demo checkpoints (or the config / command line) and runs the
launcher's ``main`` with ``--plan`` in this process: exit status 2, one ``error:`` line naming
the culprit, no traceback. ``test/e2e/test_bad_input.py`` starts the real server on a subset.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch
from checkpoint_damage import WEIGHTS_FILE, copy_checkpoint, damaged_copy, shipped_mapping, write_config

from sglang.srt.enhanced.errors import EnhancedError
from sglang.srt.enhanced.launch import main
from sglang.srt.enhanced.launch_checks import check_server_address
from sglang.srt.enhanced.mixed_precision.sources import read_header

SHARED_UP = "model.layers.0.mlp.shared_expert.up_proj"  # fp8 in the shipped mapping
EXPERT_DOWN = "model.layers.1.mlp.experts.1.down_proj"  # int4
Q_PROJ = "model.layers.0.self_attn.q_proj.weight"  # bf16


def run_plan(config: Path, model: Path, *extra: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    rc = main(["--config", str(config), "--model", str(model), "--host", "127.0.0.1", *extra, "--plan"])
    out = capsys.readouterr()
    return rc, out.err


def refused(config: Path, model: Path, *extra: str, capsys: pytest.CaptureFixture[str]) -> str:
    rc, err = run_plan(config, model, *extra, capsys=capsys)
    assert rc == 2, err[-3000:]
    assert "Traceback" not in err
    last = err.rstrip().splitlines()[-1]
    assert last.startswith("error: ") and len(last) < 1000, last[:3000]
    return last


@pytest.fixture()
def demo(demo_checkpoints: dict[str, Path]) -> dict[str, Path]:
    return {k: v.resolve() for k, v in demo_checkpoints.items()}


def test_the_shipped_setup_passes(demo, tmp_path, capsys) -> None:
    rc, err = run_plan(write_config(tmp_path, shipped_mapping(demo)), demo["bf16"], capsys=capsys)
    assert rc == 0, err[-3000:]


# -- 1, 2: FP8 scales missing, non-finite scales -----------------------------------------------


def test_fp8_weight_without_its_scale(demo, tmp_path, capsys) -> None:
    fp8 = damaged_copy(demo, "fp8", tmp_path, lambda t: t.pop(f"{SHARED_UP}.weight_scale_inv"))
    line = refused(write_config(tmp_path, shipped_mapping(demo, fp8_path=str(fp8))), demo["bf16"], capsys=capsys)
    assert f"{SHARED_UP}.weight" in line and "unscaled" in line


@pytest.mark.parametrize(("precision", "part", "value"), [
    ("int4", f"{EXPERT_DOWN}.scales", float("nan")),
    ("int4", f"{EXPERT_DOWN}.scales", float("-inf")),
    ("fp8", f"{SHARED_UP}.weight_scale_inv", float("inf")),
])
def test_non_finite_scales(demo, tmp_path, capsys, precision: str, part: str, value: float) -> None:
    def poison(tensors: dict[str, torch.Tensor]) -> None:
        tensors[part][-1, 0] = value

    folder = damaged_copy(demo, precision, tmp_path, poison)
    config = write_config(tmp_path, shipped_mapping(demo, **{f"{precision}_path": str(folder)}))
    line = refused(config, demo["bf16"], capsys=capsys)
    assert part.rsplit(".", 1)[0] + ".weight" in line and "non-finite" in line


# -- 3: a folder's format against its precision ------------------------------------------------


@pytest.mark.parametrize(("key", "folder"), [("int4_path", "bf16"), ("fp8_path", "int4"), ("bf16_path", "fp8"),
                                             ("int4_path", "fp8")])
def test_folder_of_another_format(demo, tmp_path, capsys, key: str, folder: str) -> None:
    config = write_config(tmp_path, shipped_mapping(demo, **{key: str(demo[folder])}))
    line = refused(config, demo["bf16"], capsys=capsys)
    assert f"mixed_precision.{key}" in line and str(demo[folder]) in line


def test_unquantized_folder_holding_quantized_tensors(demo, tmp_path, capsys) -> None:
    """GPTQ tensors in a folder without a quantization config are not served as bf16."""
    folder = copy_checkpoint(demo["int4"], tmp_path / "unlabelled")
    (folder / "quantize_config.json").unlink(missing_ok=True)
    config_json = json.loads((folder / "config.json").read_text())
    config_json.pop("quantization_config", None)
    (folder / "config.json").write_text(json.dumps(config_json))
    line = refused(write_config(tmp_path, shipped_mapping(demo, bf16_path=str(folder))), demo["bf16"], capsys=capsys)
    assert "quantized tensors" in line and str(folder) in line


# -- 4: safetensors headers against the file ---------------------------------------------------


def test_truncated_file(demo, tmp_path, capsys) -> None:
    folder = copy_checkpoint(demo["int4"], tmp_path / "int4")
    file = folder / WEIGHTS_FILE
    file.write_bytes(file.read_bytes()[:-4096])
    line = refused(write_config(tmp_path, shipped_mapping(demo, int4_path=str(folder))), demo["bf16"], capsys=capsys)
    assert str(file) in line and "truncated" in line


def _write_raw(path: Path, header: dict, data_bytes: int) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(data_bytes))
    return path


@pytest.mark.parametrize(("entries", "data_bytes", "why"), [
    ({"a": ("F32", [4], [0, 16]), "b": ("F32", [4], [8, 24])}, 24, "overlap"),
    ({"a": ("F32", [4], [0, 16]), "b": ("F32", [4], [20, 36])}, 36, "gap"),
    ({"a": ("F32", [4], [0, 12])}, 12, "12 bytes for F32 [4]"),
    ({"a": ("F32", [4], [16, 0])}, 16, "negative"),
    ({"a": ("F32", [4], [0, 16])}, 20, "holds 20 data bytes"),
    ({"a": ("Q7", [4], [0, 16])}, 16, "unsupported"),
])
def test_header_offsets_against_the_file(tmp_path, entries: dict, data_bytes: int, why: str) -> None:
    header = {n: {"dtype": d, "shape": s, "data_offsets": o} for n, (d, s, o) in entries.items()}
    path = _write_raw(tmp_path / "x.safetensors", header, data_bytes)
    with pytest.raises(EnhancedError) as info:
        read_header(path)
    assert str(path) in str(info.value.culprit) and why in info.value.msg


# -- 5: planned weights against the model's definition ----------------------------------------


def test_bf16_weight_of_the_wrong_shape(demo, tmp_path, capsys) -> None:
    model = damaged_copy(demo, "bf16", tmp_path, lambda t: t.update({Q_PROJ: t[Q_PROJ].reshape(32, -1)}))
    line = refused(write_config(tmp_path, shipped_mapping(demo, bf16_path=str(model))), model, capsys=capsys)
    assert Q_PROJ in line and "[32, 128]" in line and "[64, 64]" in line


def test_model_parameter_no_checkpoint_supplies(demo, tmp_path, capsys) -> None:
    model = damaged_copy(demo, "bf16", tmp_path, lambda t: t.pop("model.norm.weight"))
    line = refused(write_config(tmp_path, shipped_mapping(demo, bf16_path=str(model))), model, capsys=capsys)
    assert "model.norm.weight" in line and "no checkpoint supplies" in line


def test_integer_tensor_for_a_float_parameter(demo, tmp_path, capsys) -> None:
    def as_int(tensors: dict[str, torch.Tensor]) -> None:
        tensors["model.norm.weight"] = tensors["model.norm.weight"].view(torch.int16)

    model = damaged_copy(demo, "bf16", tmp_path, as_int)
    line = refused(write_config(tmp_path, shipped_mapping(demo, bf16_path=str(model))), model, capsys=capsys)
    assert "model.norm.weight" in line and "float" in line


# -- 6: symlink loops ---------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["int4_path", "--model", "--config"])
def test_symlink_loop(demo, tmp_path, capsys, where: str) -> None:
    loop = tmp_path / "loop"
    os.symlink(loop, loop)
    config = write_config(tmp_path, shipped_mapping(demo, **({where: str(loop)} if where == "int4_path" else {})))
    line = refused(loop if where == "--config" else config, loop if where == "--model" else demo["bf16"],
                   capsys=capsys)
    assert str(loop) in line and "symlink loop" in line


# -- 7, 8: server settings -----------------------------------------------------------------------


@pytest.mark.parametrize(("section", "key", "culprit"), [
    ("inference", {"max_seq_length": 10**29}, "inference.max_seq_length"),
    ("inference", {"max_seq_length": 4096}, "inference.max_seq_length"),  # the demo model has 2048
    ("inference", {"max_batch_size": 10**29}, "inference.max_batch_size"),
])
def test_limits_from_the_yaml(demo, tmp_path, capsys, section: str, key: dict, culprit: str) -> None:
    data = shipped_mapping(demo)
    data[section].update(key)
    line = refused(write_config(tmp_path, data), demo["bf16"], capsys=capsys)
    assert f"[culprit: {culprit}]" in line


@pytest.mark.parametrize(("extra", "culprit"), [
    (("--context-length", "100000000"), "--context-length"),
    (("--max-running-requests", "100000000000"), "--max-running-requests"),
    (("--port", "-5"), "--port"),
    (("--port", "70000"), "--port"),
    (("--host", "256.1.1.1"), "--host"),
])
def test_limits_and_address_on_the_command_line(demo, tmp_path, capsys, extra: tuple, culprit: str) -> None:
    line = refused(write_config(tmp_path, shipped_mapping(demo)), demo["bf16"], *extra, capsys=capsys)
    assert f"[culprit: {culprit}]" in line


def test_longer_context_with_sglangs_switch(demo, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN", "1")
    rc, err = run_plan(write_config(tmp_path, shipped_mapping(demo)), demo["bf16"], "--context-length", "4096",
                       capsys=capsys)
    assert rc == 0, err[-3000:]


def test_address_checks() -> None:
    check_server_address("127.0.0.1", 8080)
    for port in (0, -5, 65536, "80", True):
        with pytest.raises(EnhancedError) as info:
            check_server_address("127.0.0.1", port)
        assert info.value.culprit == "--port"
    with pytest.raises(EnhancedError) as info:
        check_server_address("192.0.2.1", 8080, host_key="server.host")  # not an address of this machine
    assert info.value.culprit == "server.host"


# -- 9: YAML alias bombs ---------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [4, 9])
def test_alias_bomb_gets_a_short_message(demo, tmp_path, capsys, depth: int) -> None:
    value = "&a0 [int4, int4, int4, int4, int4, int4, int4, int4, int4]"
    for level in range(1, depth + 1):
        value = f"&a{level} [{value}, " + ", ".join([f"*a{level - 1}"] * 8) + "]"
    config = tmp_path / "bomb.yaml"
    config.write_text(f"mixed_precision:\n  int4_path: {demo['int4']}\n  weight_mapping:\n    x: {value}\n")
    line = refused(config, demo["bf16"], capsys=capsys)
    assert len(line) < 500 and ("bomb.yaml" in line or 'weight_mapping["x"]' in line)


def test_oversized_config(demo, tmp_path, capsys) -> None:
    config = tmp_path / "big.yaml"
    config.write_text("# " + "x" * (9 << 20) + "\n")
    line = refused(config, demo["bf16"], capsys=capsys)
    assert str(config) in line and "larger than" in line


# -- 10: what the start refused and --plan used to accept ----------------------------------------


def _fp8_config_without_block_size(folder: Path) -> None:
    path = folder / "config.json"
    data = json.loads(path.read_text())
    del data["quantization_config"]["weight_block_size"]
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(("precision", "edit", "weight"), [
    ("fp8", lambda t: t.update({f"{SHARED_UP}.weight_scale_inv": t[f"{SHARED_UP}.weight_scale_inv"].reshape(1, -1)}),
     f"{SHARED_UP}.weight"),
    ("int4", lambda t: t.update({f"{EXPERT_DOWN}.qweight": t[f"{EXPERT_DOWN}.qweight"].view(torch.float32)}),
     f"{EXPERT_DOWN}.weight"),
    ("int4", lambda t: t[f"{EXPERT_DOWN}.g_idx"].__setitem__(0, 99), f"{EXPERT_DOWN}.weight"),
])
def test_faults_the_start_refuses(demo, tmp_path, capsys, precision: str, edit, weight: str) -> None:
    folder = damaged_copy(demo, precision, tmp_path, edit)
    config = write_config(tmp_path, shipped_mapping(demo, **{f"{precision}_path": str(folder)}))
    assert weight in refused(config, demo["bf16"], capsys=capsys)


def test_fp8_without_block_size(demo, tmp_path, capsys) -> None:
    folder = copy_checkpoint(demo["fp8"], tmp_path / "fp8")
    _fp8_config_without_block_size(folder)
    line = refused(write_config(tmp_path, shipped_mapping(demo, fp8_path=str(folder))), demo["bf16"], capsys=capsys)
    assert "weight_block_size" in line and ".shared_expert." in line


@pytest.mark.parametrize("model", ["int4", "missing"])
def test_model_folder_that_is_not_the_release(demo, tmp_path, capsys, model: str) -> None:
    folder = demo["int4"] if model == "int4" else tmp_path / "no-such-model"
    line = refused(write_config(tmp_path, shipped_mapping(demo)), folder, capsys=capsys)
    assert str(folder) in line


# -- valid setups of every architecture pass ----------------------------------------------------


@pytest.mark.parametrize("arch", ["qwen2_moe", "qwen3_moe", "mixtral", "olmoe", "deepseek_v3"])
def test_valid_mixed_setups_of_every_architecture_pass(arch, tiny_model_factory, tmp_path, capsys) -> None:
    """The checks refuse nothing valid: act-order GPTQ experts, per-channel FP8 attention, bf16 rest."""
    from sglang.srt.enhanced.tools.quantize import quantize_checkpoint

    bf16 = tiny_model_factory(arch)
    int4 = quantize_checkpoint(bf16, tmp_path / "int4", "gptq", bits=4, group_size=32, desc_act=True)
    fp8 = quantize_checkpoint(bf16, tmp_path / "fp8", "fp8-channel")
    mapping = {"model.layers.*.experts.*": "int4", "model.layers.*.self_attn.*_proj.weight": "fp8"}
    config = write_config(tmp_path, {"mixed_precision": {
        "bf16_path": str(bf16), "fp8_path": str(fp8), "int4_path": str(int4), "weight_mapping": mapping}})
    rc, err = run_plan(config, bf16, capsys=capsys)
    assert rc == 0, err[-3000:]
