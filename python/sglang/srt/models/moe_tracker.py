"""MoE expert activation tracker: counters, statistics, export, and router hooks."""

from sglang.srt.enhanced.moe_tracker.api import (
    export_expert_activation_stats,
    get_expert_activation_stats,
    reset_expert_activation_stats,
)
from sglang.srt.enhanced.moe_tracker.export import export_stats, render_export
from sglang.srt.enhanced.moe_tracker.hf_adapter import TrackingHandle, attach_hf_model, tracker_for_hf_model
from sglang.srt.enhanced.moe_tracker.snapshot import TrackerSnapshot
from sglang.srt.enhanced.moe_tracker.stats import expert_activation_stats
from sglang.srt.enhanced.moe_tracker.tracker import (
    ExpertActivationTracker,
    get_global_expert_tracker,
    set_global_expert_tracker,
)

__all__ = [
    "ExpertActivationTracker",
    "TrackerSnapshot",
    "TrackingHandle",
    "attach_hf_model",
    "expert_activation_stats",
    "export_expert_activation_stats",
    "export_stats",
    "get_expert_activation_stats",
    "get_global_expert_tracker",
    "render_export",
    "reset_expert_activation_stats",
    "set_global_expert_tracker",
    "tracker_for_hf_model",
]
