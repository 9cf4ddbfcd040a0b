"""Export of expert statistics: JSON, CSV and PNG, written atomically."""

from __future__ import annotations

import csv
import io
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from sglang.srt.enhanced.errors import EnhancedError
from sglang.srt.enhanced.moe_tracker.export import (
    CSV_COLUMNS,
    export_stats,
    format_for_path,
    heatmap_size,
    render_export,
)
from sglang.srt.enhanced.moe_tracker.snapshot import TrackerSnapshot
from sglang.srt.enhanced.moe_tracker.stats import expert_activation_stats
from sglang.srt.enhanced.moe_tracker.tracker import ExpertActivationTracker

NUM_LAYERS, NUM_EXPERTS = 3, 5


@pytest.fixture(scope="module")
def snapshot() -> TrackerSnapshot:
    t = ExpertActivationTracker(NUM_LAYERS, NUM_EXPERTS, 2, max_tokens=16)
    gen = torch.Generator().manual_seed(0)
    for is_decode in (False, True, True):
        t.begin_pass(16, is_decode=is_decode)
        for layer in range(NUM_LAYERS):
            t.record_routing(layer, torch.randint(0, NUM_EXPERTS - layer, (16, 2), generator=gen))
        t.end_pass()
    return t.snapshot()


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_json_round_trip_and_default_format(snapshot: TrackerSnapshot, tmp_path: Path) -> None:
    stats = expert_activation_stats(snapshot)
    path = export_stats(snapshot, tmp_path / "stats.json")
    assert json.loads(path.read_text()) == stats
    assert path.read_bytes() == render_export(stats, "json")
    for name in ("stats", "stats.txt"):
        assert format_for_path(name) == "json"
        assert json.loads(export_stats(snapshot, tmp_path / name).read_text()) == stats
    assert format_for_path("a/b.CSV") == "csv"
    # Filtered stats export as they are.
    one = expert_activation_stats(snapshot, layer_id=1, expert_id=2)
    assert json.loads(render_export(one, "json")) == one


def test_csv_rows(snapshot: TrackerSnapshot, tmp_path: Path) -> None:
    stats = expert_activation_stats(snapshot)
    path = export_stats(stats, tmp_path / "stats.csv")
    rows = list(csv.DictReader(io.StringIO(path.read_text())))
    assert tuple(rows[0]) == CSV_COLUMNS
    assert [(int(r["layer_id"]), int(r["expert_id"])) for r in rows] == [
        (lay, e) for lay in range(NUM_LAYERS) for e in range(NUM_EXPERTS)
    ]
    for row in rows:
        lay, e = int(row["layer_id"]), int(row["expert_id"])
        assert int(row["prefill_tokens"]) == snapshot.tokens[0, lay, e].item()
        assert int(row["decode_tokens"]) == snapshot.tokens[1, lay, e].item()
        assert int(row["activation_count"]) == snapshot.activations[:, lay, e].sum().item()
        assert int(row["total_tokens_processed"]) == snapshot.tokens[:, lay, e].sum().item()
        # Layer l routes only to experts 0..(NUM_EXPERTS - l - 1): the others were never active.
        if e >= NUM_EXPERTS - lay:
            assert row["last_activation_time"] == "" and row["activation_count"] == "0"
        else:
            assert float(row["last_activation_time"]) == snapshot.last_activation_time[lay, e].item()
    single = render_export(expert_activation_stats(snapshot, layer_id=0, expert_id=4), "csv").decode()
    assert single.splitlines()[1].startswith("0,4,")


def test_png_heatmap(snapshot: TrackerSnapshot, tmp_path: Path) -> None:
    import matplotlib.image

    path = export_stats(snapshot, tmp_path / "heat.png")
    data = path.read_bytes()
    assert _png_size(data) == heatmap_size(NUM_LAYERS, NUM_EXPERTS) == (480, 360)
    pixels = matplotlib.image.imread(io.BytesIO(data))
    assert pixels.shape[:2] == (360, 480)
    assert np.unique(pixels.reshape(-1, pixels.shape[-1]), axis=0).shape[0] > 10
    assert _png_size(render_export(expert_activation_stats(snapshot), "png")) == (480, 360)
    assert heatmap_size(61, 256) == (3000, 1624)


def test_atomic_write_and_errors(snapshot: TrackerSnapshot, tmp_path: Path) -> None:
    target = tmp_path / "new" / "dir" / "stats.json"
    export_stats(snapshot, target)
    assert [p.name for p in target.parent.iterdir()] == ["stats.json"]
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(EnhancedError) as err:
        export_stats(snapshot, blocker / "stats.json")
    assert err.value.culprit == str(blocker / "stats.json")
    with pytest.raises(EnhancedError) as err:
        render_export(snapshot, "xml")
    assert err.value.culprit == "xml"
    with pytest.raises(EnhancedError):
        render_export(expert_activation_stats(snapshot, layer_id=0, expert_id=0), "png")
