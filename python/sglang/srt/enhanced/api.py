"""Python API: load a mixed-precision plan into any torch module and track its experts.

Works on modules whose parameter names are the checkpoint's, e.g. a transformers
``Qwen2MoeForCausalLM`` built from its config::

    loader = EnhancedModelLoader("mixed_precision_config.yaml")
    stats = loader.load_model(model)          # weights in place, routers hooked
    model.generate(...)
    loader.get_top_experts(5)
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from sglang.srt.enhanced.config import EnhancedConfig
from sglang.srt.enhanced.errors import EnhancedError
from sglang.srt.enhanced.mixed_precision.checks import check_plan, check_source_formats
from sglang.srt.enhanced.mixed_precision.hf import load_plan_into_module
from sglang.srt.enhanced.mixed_precision.plan import build_plan
from sglang.srt.enhanced.mixed_precision.sources import open_sources
from sglang.srt.enhanced.moe_tracker.hf_adapter import TrackingHandle, attach_hf_model
from sglang.srt.enhanced.moe_tracker.tracker import ExpertActivationTracker, set_global_expert_tracker

logger = logging.getLogger(__name__)


def _model_folder(model: torch.nn.Module) -> Path | None:
    name = getattr(getattr(model, "config", None), "_name_or_path", None) or getattr(model, "name_or_path", None)
    return Path(name) if name and Path(name).is_dir() else None


class EnhancedModelLoader:
    """Mixed-precision loading and expert tracking for a torch module."""

    def __init__(self, config_path: str | Path, enable_expert_tracking: bool = True) -> None:
        self.config_path = Path(config_path)
        self.enable_expert_tracking = enable_expert_tracking
        self._tracker: ExpertActivationTracker | None = None
        self._handle: TrackingHandle | None = None

    def load_model(self, model: torch.nn.Module, enable_moe_tracking: bool = True) -> dict[str, Any]:
        """Load every planned weight into ``model`` and (optionally) hook its MoE routers.

        The fp16/bf16 source defaults to the folder the model was loaded from. Returns
        the load statistics (tensors and bytes per precision, seconds, tracking).
        """
        config = EnhancedConfig.from_yaml(self.config_path, model_path=_model_folder(model))
        with open_sources(config) as sources:
            dtype = _float_dtype(model) or config.inference.torch_dtype()
            check_source_formats(config, sources)
            plan = build_plan(config, sources, dtype=dtype)
            check_plan(plan, sources)
            stats = load_plan_into_module(model, plan, sources, dtype=dtype)
        logger.info("Mixed-precision load: %s", stats.summary_line())
        result: dict[str, Any] = stats.as_dict()
        result["expert_tracking"] = False
        if self.enable_expert_tracking and enable_moe_tracking:
            self.attach_tracking(model)
            result["expert_tracking"] = True
            result["moe_layers"] = list(self._tracker.snapshot().layer_ids) if self._tracker else []
        return result

    def attach_tracking(self, model: torch.nn.Module) -> ExpertActivationTracker:
        """Hook ``model``'s MoE routers to a fresh tracker, which becomes the global one."""
        self.detach_tracking()
        self._handle = attach_hf_model(model)
        self._tracker = self._handle.tracker
        set_global_expert_tracker(self._tracker)
        return self._tracker

    def detach_tracking(self) -> None:
        """Remove the router hooks (the statistics stay readable)."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def get_expert_tracker(self) -> ExpertActivationTracker | None:
        return self._tracker

    def _require_tracker(self) -> ExpertActivationTracker:
        if self._tracker is None:
            raise EnhancedError("expert tracking is not attached; call load_model first", culprit="expert_tracker")
        return self._tracker

    def get_expert_stats(self, layer_id: int | None = None, expert_id: int | None = None) -> dict[str, Any]:
        return self._require_tracker().get_expert_stats(layer_id=layer_id, expert_id=expert_id)

    def get_top_experts(self, top_k: int = 10) -> list[dict[str, Any]]:
        return self._require_tracker().get_top_experts(top_k)

    def get_layer_stats(self) -> dict[int, dict[str, Any]]:
        return self._require_tracker().get_layer_stats()

    def reset_expert_stats(self) -> None:
        self._require_tracker().reset_stats()

    def export_expert_stats(self, file_path: str | Path) -> None:
        self._require_tracker().export_stats(str(file_path))


def _float_dtype(model: torch.nn.Module) -> torch.dtype | None:
    for param in model.parameters():
        if param.is_floating_point():
            return param.dtype
    return None


def load_model_with_enhanced_features(
    model: torch.nn.Module, config_path: str | Path, enable_expert_tracking: bool = True
) -> dict[str, Any]:
    """Load ``model``'s weights per ``config_path`` and track its experts; returns the load stats."""
    return EnhancedModelLoader(config_path, enable_expert_tracking).load_model(model)
