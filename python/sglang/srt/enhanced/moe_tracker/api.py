"""Module-level functions of the original API, acting on the process-wide tracker."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sglang.srt.enhanced.errors import EnhancedError
from sglang.srt.enhanced.moe_tracker.tracker import ExpertActivationTracker, get_global_expert_tracker


def _tracker() -> ExpertActivationTracker:
    tracker = get_global_expert_tracker()
    if tracker is None:
        raise EnhancedError(
            "expert tracking is not enabled in this process (enable it with enable_expert_tracking=True "
            "or --enable-expert-tracking)",
            culprit="expert_tracker",
        )
    return tracker


def get_expert_activation_stats(layer_id: int | None = None, expert_id: int | None = None) -> dict[str, Any]:
    """Expert statistics of the global tracker (see ``stats.expert_activation_stats``)."""
    return _tracker().get_expert_stats(layer_id=layer_id, expert_id=expert_id)


def reset_expert_activation_stats() -> None:
    """Reset the global tracker's statistics (lifetime totals are kept)."""
    _tracker().reset_stats()


def export_expert_activation_stats(file_path: str | Path) -> None:
    """Export the global tracker's statistics to ``file_path``.

    ``.json``, ``.csv``, ``.png`` (heatmap), ``.sglang.json`` (SGLang's ``--init-expert-location``
    input); any other name gets JSON.
    """
    _tracker().export_stats(str(file_path))
