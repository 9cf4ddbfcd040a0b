"""Enhanced model loading for SGLang: mixed-precision weights and expert activation tracking.

The public entry points of sglang-enhanced's Python API (see README_ENHANCED_FEATURES.md).
"""

from sglang.srt.enhanced.api import EnhancedModelLoader, load_model_with_enhanced_features
from sglang.srt.enhanced.moe_tracker.api import (
    export_expert_activation_stats,
    get_expert_activation_stats,
    reset_expert_activation_stats,
)
from sglang.srt.enhanced.moe_tracker.tracker import get_global_expert_tracker

__all__ = [
    "EnhancedModelLoader",
    "export_expert_activation_stats",
    "get_expert_activation_stats",
    "get_global_expert_tracker",
    "load_model_with_enhanced_features",
    "reset_expert_activation_stats",
]
