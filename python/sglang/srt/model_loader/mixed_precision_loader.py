"""Mixed-precision loading: the YAML config, the per-tensor plan, and the weight stream."""

from sglang.srt.enhanced.config import EnhancedConfig, Precision
from sglang.srt.enhanced.mixed_precision.hf import load_plan_into_module
from sglang.srt.enhanced.mixed_precision.plan import LoadPlan, PlanEntry, build_plan, format_plan
from sglang.srt.enhanced.mixed_precision.sglang_loader import MixedPrecisionModelLoader
from sglang.srt.enhanced.mixed_precision.sources import CheckpointSource, open_sources
from sglang.srt.enhanced.mixed_precision.weights import LoadStats, iter_plan_weights

__all__ = [
    "CheckpointSource",
    "EnhancedConfig",
    "LoadPlan",
    "LoadStats",
    "MixedPrecisionModelLoader",
    "PlanEntry",
    "Precision",
    "build_plan",
    "format_plan",
    "iter_plan_weights",
    "load_plan_into_module",
    "open_sources",
]
