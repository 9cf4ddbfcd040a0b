"""Enhanced mixed-precision loader: GPTQ/FP8 decoding, the SGLang loader class, expert tracking."""

from sglang.srt.enhanced.api import EnhancedModelLoader, load_model_with_enhanced_features
from sglang.srt.enhanced.mixed_precision.decoders.gptq import GPTQDequantizer, is_gptq_weight
from sglang.srt.enhanced.mixed_precision.sglang_loader import MixedPrecisionModelLoader
from sglang.srt.enhanced.moe_tracker.tracker import ExpertActivationTracker, get_global_expert_tracker

__all__ = [
    "EnhancedModelLoader",
    "ExpertActivationTracker",
    "GPTQDequantizer",
    "MixedPrecisionModelLoader",
    "get_global_expert_tracker",
    "is_gptq_weight",
    "load_model_with_enhanced_features",
]
