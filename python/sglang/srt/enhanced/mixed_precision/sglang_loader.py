"""The SGLang model loader that serves a mixed-precision plan.

``get_model_loader`` in SGLang 0.4.7 accepts a loader *class* as ``load_format``;
the launcher sets ``ServerArgs.load_format = MixedPrecisionModelLoader`` and every
scheduler process builds the model through it. Weights go to the model's own
``load_weights`` as ``(checkpoint name, tensor)`` pairs, so tensor parallelism
shards them exactly as for a stock load.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from sglang.srt.configs.device_config import DeviceConfig
from sglang.srt.configs.load_config import LoadConfig
from sglang.srt.configs.model_config import ModelConfig
from sglang.srt.enhanced.config import EnhancedConfig
from sglang.srt.enhanced.mixed_precision.checks import check_plan, check_source_formats, model_tensor_shapes
from sglang.srt.enhanced.mixed_precision.plan import LoadPlan, build_plan
from sglang.srt.enhanced.mixed_precision.sources import CheckpointSource, SourceSet, open_sources
from sglang.srt.enhanced.mixed_precision.weights import LoadStats, iter_plan_weights
from sglang.srt.enhanced.settings import LaunchSettings
from sglang.srt.model_loader.loader import BaseModelLoader, DefaultModelLoader, _initialize_model
from sglang.srt.model_loader.utils import set_default_torch_dtype

logger = logging.getLogger(__name__)


def load_enhanced_config(config_path: Path | None, model_path: str | Path) -> EnhancedConfig:
    """The launch config, or (without one) a plan that reads every weight from ``model_path``."""
    if config_path is None:
        return EnhancedConfig.from_mapping({"mixed_precision": {}}, model_path=model_path)
    return EnhancedConfig.from_yaml(config_path, model_path=model_path)


def prepare_plan(config: EnhancedConfig, dtype: torch.dtype) -> tuple[LoadPlan, SourceSet]:
    """Open the sources and build the plan; every check happens here, before any weight is read."""
    sources = open_sources(config)
    try:
        check_source_formats(config, sources)
        plan = build_plan(config, sources, dtype=dtype)
        model = config.model_path
        has_definition = model is not None and (model / "config.json").is_file()
        check_plan(plan, sources, model_tensor_shapes(model) if has_definition else None)
    except Exception:
        sources.close()
        raise
    return plan, sources


class MixedPrecisionModelLoader(BaseModelLoader):
    """Builds the model with SGLang and fills it from the mixed-precision plan."""

    def __init__(self, load_config: LoadConfig) -> None:
        super().__init__(load_config)
        self.settings = LaunchSettings.from_env()

    def download_model(self, model_config: ModelConfig) -> None:
        """Nothing to download: every source is a local folder."""

    def load_model(self, *, model_config: ModelConfig, device_config: DeviceConfig) -> nn.Module:
        target_device = torch.device(device_config.device)
        if target_device.type == "cpu":
            from sglang.srt.enhanced.cpu_mode.moe import route_moe_to_native

            route_moe_to_native()
        config = load_enhanced_config(self.settings.config_path, model_config.model_path)
        plan, sources = prepare_plan(config, model_config.dtype)
        stats = LoadStats()
        try:
            with set_default_torch_dtype(model_config.dtype), target_device:
                model = _initialize_model(model_config, self.load_config)
            weights = iter_plan_weights(
                plan, sources, dtype=model_config.dtype, device=target_device, stats=stats,
                progress=self.settings.progress and _is_first_rank(),
            )
            DefaultModelLoader.load_weights_and_postprocess(model, weights, target_device)
        finally:
            sources.close()
        if _is_first_rank():
            logger.info("Mixed-precision load: %s", stats.summary_line())
        return model.eval()


def _is_first_rank() -> bool:
    try:
        from sglang.srt.distributed import get_tensor_model_parallel_rank

        return get_tensor_model_parallel_rank() == 0
    except (AssertionError, ImportError):
        return True


__all__ = ["CheckpointSource", "MixedPrecisionModelLoader", "load_enhanced_config", "prepare_plan"]
