"""Checkpoint folders (single file, several files, sharded with an index) and streaming a plan's weights."""

from __future__ import annotations

import json
import weakref
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sglang.srt.enhanced.config import EnhancedConfig, Precision
from sglang.srt.enhanced.errors import EnhancedError
from sglang.srt.enhanced.mixed_precision import sources as sources_mod
from sglang.srt.enhanced.mixed_precision.plan import build_plan
from sglang.srt.enhanced.mixed_precision.sources import INDEX_FILE, CheckpointSource, open_sources
from sglang.srt.enhanced.mixed_precision.weights import LoadStats, iter_plan_weights


def tensors(seed: int, names: list[str], dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(3 + i, 5, generator=g).to(dtype) for i, n in enumerate(names)}


SHARDS = {
    "model-00001-of-00003.safetensors": [
        "model.embed_tokens.weight",
        "model.layers.0.self_attn.q_proj.weight",
    ],
    "model-00002-of-00003.safetensors": [
        "model.layers.0.mlp.gate.weight",
        "model.layers.0.mlp.up_proj.weight",
    ],
    "model-00003-of-00003.safetensors": ["model.norm.weight", "lm_head.weight"],
}


def write_sharded(folder: Path, with_index: bool = True) -> dict[str, torch.Tensor]:
    """Three shard files (and their index); returns every tensor written."""
    folder.mkdir(parents=True, exist_ok=True)
    everything: dict[str, torch.Tensor] = {}
    for i, (file, names) in enumerate(SHARDS.items()):
        part = tensors(i, names)
        save_file(part, str(folder / file))
        everything.update(part)
    if with_index:
        weight_map = {n: f for f, names in SHARDS.items() for n in names}
        (folder / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return everything


class CountingSafeOpen:
    """Wraps ``safe_open`` in the sources module and records every file it opens."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.opened: list[str] = []
        real = sources_mod.safe_open

        def counting(path: str, *args: object, **kwargs: object) -> object:
            self.opened.append(Path(path).name)
            return real(path, *args, **kwargs)

        monkeypatch.setattr(sources_mod, "safe_open", counting)


def test_single_file_metadata_and_reads(tmp_path: Path) -> None:
    data = {
        "b.weight": torch.arange(12, dtype=torch.float32).reshape(3, 4),
        "a.weight": torch.ones(2, 7, dtype=torch.bfloat16),
        "c.qweight": torch.arange(6, dtype=torch.int32).reshape(2, 3),
        "d.weight": torch.zeros(4, 4).to(torch.float8_e4m3fn),
    }
    save_file(data, str(tmp_path / "model.safetensors"))
    with CheckpointSource(tmp_path) as src:
        assert set(src.stored_names) == set(data)
        assert len(src) == 4 and "a.weight" in src and "x" not in src
        assert src.shape("b.weight") == (3, 4)
        assert src.dtype("a.weight") == torch.bfloat16
        assert src.dtype("c.qweight") == torch.int32
        assert src.dtype("d.weight") == torch.float8_e4m3fn
        assert src.nbytes("b.weight") == 3 * 4 * 4
        assert src.nbytes("a.weight") == 2 * 7 * 2
        assert src.nbytes("d.weight") == 16
        assert src.file_of("c.qweight") == tmp_path / "model.safetensors"
        assert src.files == (tmp_path / "model.safetensors",)
        # Checkpoint order is the byte order in the file.
        offsets = [src.info(n).offset for n in src.stored_names]
        assert offsets == sorted(offsets)
        for name, tensor in data.items():
            assert torch.equal(src.read(name).view(torch.uint8), tensor.view(torch.uint8))
    with pytest.raises(EnhancedError) as info:
        CheckpointSource(tmp_path).shape("nope.weight")
    assert info.value.culprit == "nope.weight"


def test_construction_reads_headers_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    save_file({"w": torch.ones(64, 64)}, str(tmp_path / "model.safetensors"))
    path = tmp_path / "model.safetensors"
    counter = CountingSafeOpen(monkeypatch)
    src = CheckpointSource(tmp_path)
    assert src.shape("w") == (64, 64) and src.nbytes("w") == 64 * 64 * 4
    assert counter.opened == [] and src.open_files == ()
    path.write_bytes(path.read_bytes()[:-100])  # data section truncated; header intact
    with pytest.raises(EnhancedError) as info:
        CheckpointSource(tmp_path)  # found from the header and the file size alone
    assert info.value.culprit == str(path) and "truncated" in info.value.msg
    assert counter.opened == []


def test_several_files_without_index(tmp_path: Path) -> None:
    everything = write_sharded(tmp_path, with_index=False)
    src = CheckpointSource(tmp_path)
    assert set(src.stored_names) == set(everything)
    assert [f.name for f in src.files] == sorted(SHARDS)
    assert src.file_of("lm_head.weight").name == "model-00003-of-00003.safetensors"
    assert torch.equal(
        src.read("model.layers.0.mlp.up_proj.weight"), everything["model.layers.0.mlp.up_proj.weight"]
    )


def test_tensor_stored_in_two_files_is_an_error(tmp_path: Path) -> None:
    save_file({"x.weight": torch.ones(2)}, str(tmp_path / "a.safetensors"))
    save_file({"x.weight": torch.ones(2)}, str(tmp_path / "b.safetensors"))
    with pytest.raises(EnhancedError) as info:
        CheckpointSource(tmp_path)
    assert info.value.culprit == "x.weight"
    assert "a.safetensors" in info.value.msg and "b.safetensors" in info.value.msg


def test_sharded_with_index(tmp_path: Path) -> None:
    everything = write_sharded(tmp_path)
    save_file({"stray": torch.ones(1)}, str(tmp_path / "consolidated.safetensors"))  # not in the index
    src = CheckpointSource(tmp_path)
    assert set(src.stored_names) == set(everything)
    assert "stray" not in src
    assert src.file_of("model.norm.weight").name == "model-00003-of-00003.safetensors"
    for name, tensor in everything.items():
        assert torch.equal(src.read(name), tensor)


def test_index_pointing_to_missing_file(tmp_path: Path) -> None:
    write_sharded(tmp_path)
    (tmp_path / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(EnhancedError) as info:
        CheckpointSource(tmp_path)
    assert info.value.culprit == str(tmp_path / "model-00002-of-00003.safetensors")
    assert "does not exist" in info.value.msg


def test_index_placing_a_tensor_in_the_wrong_file(tmp_path: Path) -> None:
    write_sharded(tmp_path)
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    index["weight_map"]["lm_head.weight"] = "model-00001-of-00003.safetensors"
    (tmp_path / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(EnhancedError) as info:
        CheckpointSource(tmp_path)
    assert info.value.culprit == "lm_head.weight"
    assert "model-00001-of-00003.safetensors" in info.value.msg


@pytest.mark.parametrize("content", ["{not json", '{"metadata": {}}', '{"weight_map": [1]}'])
def test_unreadable_index(tmp_path: Path, content: str) -> None:
    write_sharded(tmp_path)
    (tmp_path / INDEX_FILE).write_text(content)
    with pytest.raises(EnhancedError) as info:
        CheckpointSource(tmp_path)
    assert info.value.culprit == str(tmp_path / INDEX_FILE)


def test_missing_folder_empty_folder_and_corrupt_file(tmp_path: Path) -> None:
    with pytest.raises(EnhancedError, match="does not exist") as info:
        CheckpointSource(tmp_path / "absent")
    assert info.value.culprit == str(tmp_path / "absent")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(EnhancedError, match="no \\*.safetensors") as info:
        CheckpointSource(tmp_path)
    assert info.value.culprit == str(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(EnhancedError, match="not a safetensors file") as info:
        CheckpointSource(tmp_path)
    assert info.value.culprit == str(tmp_path / "model.safetensors")


def test_each_file_is_opened_once_and_reopened_after_close(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_sharded(tmp_path)
    counter = CountingSafeOpen(monkeypatch)
    src = CheckpointSource(tmp_path)
    src.read("model.embed_tokens.weight")
    src.read("model.layers.0.self_attn.q_proj.weight")
    src.read("model.embed_tokens.weight")
    assert counter.opened == ["model-00001-of-00003.safetensors"]
    src.close()
    assert src.open_files == ()
    src.read("model.embed_tokens.weight")
    assert counter.opened == ["model-00001-of-00003.safetensors"] * 2


def test_plain_decoder_logical_names(tmp_path: Path) -> None:
    everything = write_sharded(tmp_path)
    src = CheckpointSource(tmp_path)
    assert src.decoder.format_name == "plain"
    assert src.logical_names() == {n: (n,) for n in src.stored_names}
    assert set(src.logical_names()) == set(everything)


def test_open_sources_shares_a_folder_and_names_the_config_key(tmp_path: Path) -> None:
    write_sharded(tmp_path / "model")
    config = EnhancedConfig.from_mapping(
        {"mixed_precision": {"weight_mapping": {"lm_head.weight": "fp16"}}}, model_path=tmp_path / "model"
    )
    sources = open_sources(config)
    assert set(sources) == {Precision.FP16, Precision.BF16}
    assert sources[Precision.FP16] is sources[Precision.BF16]
    bad = EnhancedConfig.from_mapping(
        {
            "mixed_precision": {
                "int4_path": str(tmp_path / "gptq"),
                "weight_mapping": {"lm_head.weight": "int4"},
            }
        },
        model_path=tmp_path / "model",
    )
    with pytest.raises(EnhancedError) as info:
        open_sources(bad)
    assert info.value.culprit == str(tmp_path / "gptq")
    assert "mixed_precision.int4_path" in info.value.msg


# -- streaming a plan --------------------------------------------------------------------------------


def plan_for(folder: Path, names: list[str] | None = None, dtype: torch.dtype = torch.bfloat16):
    config = EnhancedConfig.from_mapping({"mixed_precision": {"bf16_path": str(folder)}})
    sources = open_sources(config)
    return build_plan(config, sources, names, dtype=dtype), sources


def test_iter_reads_only_planned_files_once_and_matches_load_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_sharded(tmp_path)
    wanted = ["lm_head.weight", "model.layers.0.self_attn.q_proj.weight", "model.embed_tokens.weight"]
    plan, sources = plan_for(tmp_path, wanted)
    counter = CountingSafeOpen(monkeypatch)
    stats = LoadStats()
    got = list(iter_plan_weights(plan, sources, dtype=torch.bfloat16, stats=stats, progress=False))
    assert counter.opened == ["model-00001-of-00003.safetensors", "model-00003-of-00003.safetensors"]
    # Grouped by file in checkpoint order, byte order within a file.
    src = sources[Precision.BF16]
    first_file = sorted(wanted[1:], key=lambda n: src.info(n).offset)
    assert [n for n, _ in got] == [*first_file, "lm_head.weight"]
    reference = {**load_file(str(tmp_path / "model-00001-of-00003.safetensors")),
                 **load_file(str(tmp_path / "model-00003-of-00003.safetensors"))}  # fmt: skip
    for name, tensor in got:
        assert tensor.dtype == torch.bfloat16
        assert torch.equal(tensor, reference[name])
    assert stats.tensors == {Precision.BF16: 3}
    expected_bytes = sum(reference[n].numel() * 2 for n in wanted)
    assert stats.bytes_on_disk == {Precision.BF16: expected_bytes}
    assert stats.bytes_loaded == {Precision.BF16: expected_bytes}
    assert stats.seconds > 0
    assert stats.summary_line().startswith("loaded 3 weights (")
    assert "bf16: 3 tensors" in stats.summary_line()


def test_iter_casts_to_the_serving_dtype(tmp_path: Path) -> None:
    data = {"a.weight": torch.randn(4, 6, generator=torch.Generator().manual_seed(3))}
    save_file(data, str(tmp_path / "model.safetensors"))
    plan, sources = plan_for(tmp_path, dtype=torch.float16)
    ((name, tensor),) = list(iter_plan_weights(plan, sources, dtype=torch.float16, progress=False))
    assert name == "a.weight"
    assert torch.equal(tensor, data["a.weight"].to(torch.float16))
    assert plan.entry("a.weight").bytes_on_disk == 4 * 6 * 4
    assert plan.entry("a.weight").bytes_loaded == 4 * 6 * 2


def test_iter_holds_one_weight_at_a_time(tmp_path: Path) -> None:
    write_sharded(tmp_path)
    plan, sources = plan_for(tmp_path)
    refs: list[weakref.ref] = []
    for _, tensor in iter_plan_weights(plan, sources, dtype=torch.bfloat16, progress=False):
        # Every earlier weight was dropped by the consumer; the iterator must not keep it alive.
        assert all(r() is None for r in refs)
        refs.append(weakref.ref(tensor))
        del tensor
    assert len(refs) == 6
    assert all(r() is None for r in refs)


# -- on a GPU ----------------------------------------------------------------------------------------


def write_moe_checkpoint(folder: Path, layers: int = 2, experts: int = 8) -> None:
    """A bf16 MoE-shaped checkpoint (attention, router, experts, shared expert) with a config.json."""
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(7)
    hidden, inter = 64, 32
    out: dict[str, torch.Tensor] = {"model.embed_tokens.weight": torch.randn(32, hidden, generator=g)}
    for layer in range(layers):
        p = f"model.layers.{layer}"
        out[f"{p}.self_attn.q_proj.weight"] = torch.randn(hidden, hidden, generator=g)
        out[f"{p}.mlp.gate.weight"] = torch.randn(experts, hidden, generator=g)
        for e in range(experts):
            out[f"{p}.mlp.experts.{e}.gate_proj.weight"] = torch.randn(inter, hidden, generator=g)
            out[f"{p}.mlp.experts.{e}.down_proj.weight"] = torch.randn(hidden, inter, generator=g)
        out[f"{p}.mlp.shared_expert.up_proj.weight"] = torch.randn(inter * 2, hidden, generator=g)
    save_file({k: v.to(torch.bfloat16) for k, v in out.items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen2_moe", "torch_dtype": "bfloat16"}))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_decoding_matches_cpu(tmp_path: Path) -> None:
    from sglang.srt.enhanced.tools.quantize import quantize_checkpoint

    write_moe_checkpoint(tmp_path / "bf16")
    quantize_checkpoint(tmp_path / "bf16", tmp_path / "gptq", "gptq", bits=4, group_size=32, desc_act=True)
    quantize_checkpoint(tmp_path / "bf16", tmp_path / "fp8", "fp8-block", block_size=(16, 32))
    section = {
        "int4_path": str(tmp_path / "gptq"),
        "fp8_path": str(tmp_path / "fp8"),
        "weight_mapping": {"model.layers.*.mlp.experts.*": "int4", "*.shared_expert.*": "fp8"},
    }
    config = EnhancedConfig.from_mapping({"mixed_precision": section}, model_path=tmp_path / "bf16")
    sources = open_sources(config)
    plan = build_plan(config, sources)
    assert plan.summary()[Precision.INT4].tensors == 2 * 8 * 2
    cpu = dict(iter_plan_weights(plan, sources, dtype=torch.bfloat16, progress=False))
    decoder = sources[Precision.INT4].decoder
    calls: list[int] = []
    real = decoder.decode_many

    def spy(names, parts_list, dtype):
        calls.append(len(names))
        assert all(t.is_cuda for parts in parts_list for t in parts.values())
        return real(names, parts_list, dtype)

    decoder.decode_many = spy  # type: ignore[method-assign]
    gpu = list(iter_plan_weights(plan, sources, dtype=torch.bfloat16, device="cuda", progress=False))
    assert calls == [8, 8, 8, 8]  # one batched call per layer and projection
    assert sorted(n for n, _ in gpu) == sorted(cpu)
    for name, tensor in gpu:
        assert tensor.is_cuda and tensor.dtype == torch.bfloat16
        # Triton and the torch reference both compute in float32 and round once to bf16.
        torch.testing.assert_close(tensor.cpu(), cpu[name], rtol=0, atol=0, msg=name)
