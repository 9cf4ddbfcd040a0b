"""Export expert statistics as JSON, CSV, a PNG heatmap or SGLang's expert-location input.

The format follows the file extension: ``.json``, ``.csv``, ``.png``, ``.sglang.json``
(``sglang``: exactly what SGLang's ``--init-expert-location FILE`` reads, ``{"logical_count":
[layers][experts]}`` tokens per expert over every hidden layer, dense layers zero); any other
extension (or none) gets JSON. Files are written atomically (a temporary file in the same folder,
then ``os.replace``). :func:`render_export` returns the bytes instead, for HTTP downloads.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from sglang.srt.enhanced.errors import EnhancedError
from sglang.srt.enhanced.moe_tracker.snapshot import TrackerSnapshot
from sglang.srt.enhanced.moe_tracker.stats import expert_activation_stats

logger = logging.getLogger(__name__)

FORMATS = ("json", "csv", "png", "sglang")
CSV_COLUMNS = (
    "layer_id",
    "expert_id",
    "activation_count",
    "total_tokens_processed",
    "prefill_tokens",
    "decode_tokens",
    "prefill_activations",
    "decode_activations",
    "share_of_layer_tokens",
    "last_activation_time",
)
MEDIA_TYPES = {"json": "application/json", "csv": "text/csv", "png": "image/png", "sglang": "application/json"}
FILE_NAMES = {"json": "expert_stats.json", "csv": "expert_stats.csv", "png": "expert_stats.png",
              "sglang": "expert_stats.sglang.json"}

StatsLike = TrackerSnapshot | dict[str, Any]


def format_for_path(path: str | os.PathLike[str]) -> str:
    """The export format of ``path``: its extension if known (``.sglang.json``: sglang), else ``"json"``."""
    if Path(path).name.lower().endswith(".sglang.json"):
        return "sglang"
    ext = Path(path).suffix.lower().lstrip(".")
    return ext if ext in FORMATS else "json"


def export_stats(data: StatsLike, path: str | os.PathLike[str], *, fmt: str | None = None) -> Path:
    """Write ``data`` (a snapshot or a stats dict) to ``path`` atomically; return the path.

    ``fmt`` overrides the format chosen from the extension. Parent folders are created.
    """
    path = Path(path)
    fmt = fmt or format_for_path(path)
    if fmt == "json" and path.suffix.lower() not in ("", ".json"):
        logger.info("exporting expert stats as JSON to %s (unknown extension)", path)
    payload = render_export(data, fmt)
    _atomic_write(path, payload)
    return path


def render_export(data: StatsLike, fmt: str) -> bytes:
    """``data`` (a snapshot or a stats dict) rendered as ``fmt`` (json, csv or png)."""
    if fmt not in FORMATS:
        raise EnhancedError(f"unknown export format; valid: {list(FORMATS)}", culprit=fmt)
    stats = expert_activation_stats(data) if isinstance(data, TrackerSnapshot) else data
    if not isinstance(stats, dict):
        raise EnhancedError("expected a TrackerSnapshot or a stats dict", culprit=type(data).__name__)
    if fmt == "json":
        return (json.dumps(stats, indent=2) + "\n").encode()
    if fmt == "sglang":
        return (json.dumps(sglang_expert_location(stats)) + "\n").encode()
    if fmt == "csv":
        return _render_csv(stats)
    return _render_png(stats)


def sglang_expert_location(stats: dict[str, Any]) -> dict[str, list[list[int]]]:
    """SGLang's ``--init-expert-location`` input: ``logical_count`` [hidden layers, experts] tokens.

    Rows follow SGLang's layer numbering (every hidden layer); layers without MoE are zero.
    """
    if "layer_stats" not in stats or "summary" not in stats:
        raise EnhancedError("the SGLang expert-location export needs 'layer_stats' and 'summary'", culprit="stats")
    summary = stats["summary"]
    num_experts = int(summary["num_experts"])
    num_layers = int(summary.get("num_hidden_layers") or 1 + max((int(k) for k in stats["layer_stats"]), default=-1))
    rows = [[0] * num_experts for _ in range(num_layers)]
    for key, layer in stats["layer_stats"].items():
        experts = layer["experts"]
        rows[int(key)] = [int(experts.get(str(e), {}).get("total_tokens_processed", 0)) for e in range(num_experts)]
    return {"logical_count": rows}


def render_coactivation_png(coactivation: dict[str, Any]) -> bytes:
    """A heatmap of one layer's co-activation counts (:func:`stats.coactivation_stats`)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    matrix, n = coactivation["counts"], coactivation["num_experts"]
    side = min(max(300 + 16 * n, 480), 3000)
    fig = Figure(figsize=(side / 100, side / 100), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(matrix, cmap="magma", interpolation="nearest")
    fig.colorbar(image, ax=ax, label="tokens that chose both experts")
    ax.set_xlabel("expert")
    ax.set_ylabel("expert")
    ax.set_title(f"Expert co-activation, layer {coactivation['layer_id']}")
    step = max(1, math.ceil(n / 32))
    ax.set_xticks(range(0, n, step))
    ax.set_yticks(range(0, n, step))
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def heatmap_size(num_layers: int, num_experts: int) -> tuple[int, int]:
    """Width and height in pixels of the PNG heatmap of ``num_layers`` x ``num_experts``."""
    width = min(max(200 + 24 * num_experts, 480), 3000)
    height = min(max(160 + 24 * num_layers, 360), 3000)
    return width, height


def _expert_rows(stats: dict[str, Any]) -> list[dict[str, Any]]:
    if "expert_stats" in stats:
        rows = list(stats["expert_stats"].values())
    elif "layer_id" in stats and "expert_id" in stats:
        rows = [stats]
    else:
        raise EnhancedError("stats dict has neither 'expert_stats' nor an expert entry", culprit="stats")
    return sorted(rows, key=lambda r: (r["layer_id"], r["expert_id"]))


def _render_csv(stats: dict[str, Any]) -> bytes:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in _expert_rows(stats):
        writer.writerow({k: "" if row.get(k) is None else row[k] for k in CSV_COLUMNS})
    return out.getvalue().encode()


def _share_matrix(stats: dict[str, Any]) -> tuple[list[int], int, list[list[float]]]:
    if "layer_stats" not in stats:
        raise EnhancedError("a heatmap needs 'layer_stats'", culprit="stats")
    layers = sorted(stats["layer_stats"], key=int)
    num_experts = max((int(stats["layer_stats"][k]["total_experts"]) for k in layers), default=0)
    matrix = []
    for key in layers:
        experts = stats["layer_stats"][key]["experts"]
        tokens = [int(experts.get(str(e), {}).get("total_tokens_processed", 0)) for e in range(num_experts)]
        total = sum(tokens)
        matrix.append([t / total if total else 0.0 for t in tokens])
    return [int(k) for k in layers], num_experts, matrix


def _render_png(stats: dict[str, Any]) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    layers, num_experts, matrix = _share_matrix(stats)
    if not layers or num_experts == 0:
        raise EnhancedError("no MoE layers to draw", culprit="layer_stats")
    width, height = heatmap_size(len(layers), num_experts)
    fig = Figure(figsize=(width / 100, height / 100), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    vmax = max(max(row) for row in matrix) or 1.0
    image = ax.imshow(matrix, aspect="auto", cmap="viridis", vmin=0.0, vmax=vmax, interpolation="nearest")
    fig.colorbar(image, ax=ax, label="share of the layer's tokens")
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_title("Expert token share per layer")
    step = max(1, math.ceil(len(layers) / 32))
    ax.set_yticks(range(0, len(layers), step), [str(layers[i]) for i in range(0, len(layers), step)])
    xstep = max(1, math.ceil(num_experts / 32))
    ax.set_xticks(range(0, num_experts, xstep))
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def _atomic_write(path: Path, payload: bytes) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise EnhancedError(f"cannot write expert stats: {e}", culprit=str(path)) from e
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as e:
        _unlink_quietly(tmp)
        raise EnhancedError(f"cannot write expert stats: {e}", culprit=str(path)) from e
    except BaseException:
        _unlink_quietly(tmp)
        raise


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
