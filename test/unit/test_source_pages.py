"""CheckpointSource.release_pages: file pages of consumed tensors leave this process, data stays valid."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sglang.srt.enhanced.config import EnhancedConfig
from sglang.srt.enhanced.mixed_precision import weights as weights_mod
from sglang.srt.enhanced.mixed_precision.plan import build_plan
from sglang.srt.enhanced.mixed_precision.sources import CheckpointSource, open_sources

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc and madvise")


def resident_kib(file: Path) -> int:
    """Resident KiB of this process's mappings of ``file`` (from /proc/self/smaps)."""
    target, total, inside = str(file.resolve()), 0, False
    with open("/proc/self/smaps", encoding="utf-8") as smaps:
        for line in smaps:
            first = line.split(maxsplit=5)
            if "-" in first[0] and len(first) >= 5:  # a mapping header line
                inside = len(first) == 6 and first[5].strip() == target
            elif inside and line.startswith("Rss:"):
                total += int(line.split()[1])
    return total


@pytest.fixture
def checkpoint(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    tensors = {f"w{i}": torch.randn(512, 1024, generator=gen) for i in range(4)}  # 2 MiB each
    save_file(tensors, str(tmp_path / "model.safetensors"))
    return tmp_path, tensors


def test_release_drops_resident_pages_and_keeps_data(checkpoint) -> None:
    folder, expected = checkpoint
    file = folder / "model.safetensors"
    source = CheckpointSource(folder)
    read = {name: source.read(name) for name in expected}
    sums = {name: float(t.sum()) for name, t in read.items()}  # touches every page
    assert resident_kib(file) >= 4 * 2048
    released = source.release_pages()
    # Whole pages inside each tensor are released: all but at most one page at each end.
    assert released >= 4 * (2 * 1024 * 1024 - 2 * 4096)
    assert resident_kib(file) <= 4 * 2 * 4  # only the partial boundary pages may stay
    for name, tensor in read.items():
        assert torch.equal(tensor, expected[name])  # faulted back in from the page cache
        assert float(tensor.sum()) == sums[name]
    assert source.release_pages() == 0  # nothing read since the last call
    source.close()


def test_reads_to_another_device_release_at_once(checkpoint) -> None:
    folder, expected = checkpoint
    source = CheckpointSource(folder)
    # "meta" stands in for an accelerator: the host tensor is dropped right after the copy.
    out = source.read("w0", device="meta")
    assert out.device.type == "meta" and out.shape == expected["w0"].shape
    assert source.release_pages() == 0
    assert resident_kib(folder / "model.safetensors") <= 2 * 4
    source.close()


def test_release_waits_for_min_bytes(checkpoint) -> None:
    folder, expected = checkpoint
    file = folder / "model.safetensors"
    source = CheckpointSource(folder)
    for name in ("w0", "w1"):
        source.read(name).sum()
    assert source.release_pages(min_bytes=8 << 20) == 0  # 4 MiB read so far
    assert resident_kib(file) >= 2 * 2048
    source.read("w2").sum()
    source.read("w3").sum()
    # 8 MiB read: one release of the four neighbouring tensors, shared boundary pages included.
    assert source.release_pages(min_bytes=8 << 20) >= 4 * 2 * 1024 * 1024 - 2 * 4096
    assert resident_kib(file) <= 2 * 4
    source.close()


def test_streaming_a_plan_keeps_file_pages_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gen = torch.Generator().manual_seed(1)
    data = {f"model.layers.{i}.mlp.down_proj.weight": torch.randn(256, 1024, generator=gen) for i in range(12)}
    save_file(data, str(tmp_path / "model.safetensors"))  # 12 x 1 MiB
    monkeypatch.setattr(weights_mod, "RELEASE_BYTES", 3 << 20)
    config = EnhancedConfig.from_mapping({"mixed_precision": {"fp32_path": str(tmp_path)}})
    sources = open_sources(config)
    plan = build_plan(config, sources, dtype=torch.float32)
    peak = 0
    for name, tensor in weights_mod.iter_plan_weights(plan, sources, dtype=torch.float32, progress=False):
        assert torch.equal(tensor, data[name])  # touches every page of the weight
        peak = max(peak, resident_kib(tmp_path / "model.safetensors"))
        del tensor
    # Without releases all 12 MiB would stay mapped; with them at most 3 MiB + one weight.
    assert 1024 <= peak <= 4 * 1024 + 8
    assert resident_kib(tmp_path / "model.safetensors") <= 64  # the header's pages may stay
    sources.close()
