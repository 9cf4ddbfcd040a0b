"""The SGLang model loader that serves a mixed-precision plan.

``get_model_loader`` in SGLang 0.4.7 accepts a loader *class* as ``load_format``;
the launcher hands SGLang a subclass of :class:`MixedPrecisionModelLoader` and every
scheduler process builds the model through it. Weights go to the model's own
``load_weights`` as ``(checkpoint name, tensor)`` pairs, so tensor parallelism
shards them exactly as for a stock load (packed tensors by the packed methods'
weight loaders, cut the same way).
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
from sglang.srt.enhanced.mixed_precision.serving.layout import build_layout
from sglang.srt.enhanced.mixed_precision.serving.quant_config import PackedQuantConfig
from sglang.srt.enhanced.mixed_precision.serving.report import memory_report, write_report
from sglang.srt.enhanced.mixed_precision.sources import CheckpointSource, SourceSet, open_sources
from sglang.srt.enhanced.mixed_precision.weights import LoadStats, iter_plan_weights
from sglang.srt.enhanced.settings import LaunchSettings
from sglang.srt.model_loader.loader import BaseModelLoader, DefaultModelLoader
from sglang.srt.model_loader.utils import get_model_architecture, set_default_torch_dtype

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
    """Builds the model with SGLang and fills it from the mixed-precision plan.

    With ``mixed_precision.serve: packed`` the model is built with a
    :class:`PackedQuantConfig` of the plan's serving layout, and the weights of packed
    modules are streamed as stored. After loading, this rank's memory report is logged
    (the load summary line) and written to the launcher's state folder.
    """

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
        first = _is_first_rank()
        try:
            layout = build_layout(plan, sources, _serve_mode(config))
            quant_config = PackedQuantConfig(layout, warn=first) if layout.serve == "packed" else None
            with set_default_torch_dtype(model_config.dtype), target_device:
                model_class, _ = get_model_architecture(model_config)
                model = model_class(config=model_config.hf_config, quant_config=quant_config)
            packed = _packed_parts(quant_config)
            weights = iter_plan_weights(
                plan, sources, dtype=model_config.dtype, device=target_device, stats=stats,
                progress=self.settings.progress and first, packed=packed,
            )
            DefaultModelLoader.load_weights_and_postprocess(model, weights, target_device)
        finally:
            sources.close()
        rank, size = _tp_rank_and_size()
        report = memory_report(model, plan, layout, tp_rank=rank, tp_size=size)
        if self.settings.state_dir is not None:
            write_report(self.settings.state_dir, report)
        if first:
            in_memory = {p: v["bytes_in_memory"] for p, v in report["precisions"].items()}
            logger.info("Mixed-precision load: serve %s%s, %s", layout.serve,
                        f" (bytes in memory per TP rank of {size})" if size > 1 else "", stats.summary_line(in_memory))
        return model.eval()


def _serve_mode(config: EnhancedConfig) -> str:
    """``packed`` unless the config says decoded or experts are spread by expert parallelism."""
    serve = config.mixed_precision.serve
    if serve == "packed":
        from sglang.srt.managers.schedule_batch import global_server_args_dict

        if global_server_args_dict.get("enable_ep_moe") or global_server_args_dict.get("enable_deepep_moe"):
            if _is_first_rank():
                logger.warning("expert parallelism is on: every weight is served decoded "
                               "(packed serving covers tensor parallelism only)")
            return "decoded"
    return serve


def _packed_parts(quant_config: PackedQuantConfig | None) -> dict[str, tuple[str, ...]]:
    """Stored parts to stream as stored, per planned weight of a module that got a packed method."""
    if quant_config is None:
        return {}
    out: dict[str, tuple[str, ...]] = {}
    for assigned in quant_config.assigned.values():
        if assigned.layout is None or assigned.layout.method != "packed":
            continue
        groups = [s.layout.parts for s in assigned.layout.expert_sets] or [assigned.layout.parts]
        for parts in groups:
            keep_g_idx = all(p.dtype_of("g_idx") is not None for p in parts)
            for part in parts:
                out[part.entry.name] = tuple(
                    n for n in part.entry.stored_parts if keep_g_idx or not n.endswith(".g_idx")
                )
    return out


def _tp_rank_and_size() -> tuple[int, int]:
    try:
        from sglang.srt.distributed import (
            get_tensor_model_parallel_rank,
            get_tensor_model_parallel_world_size,
        )

        return get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()
    except (AssertionError, ImportError):
        return 0, 1


def _is_first_rank() -> bool:
    try:
        from sglang.srt.distributed import get_tensor_model_parallel_rank

        return get_tensor_model_parallel_rank() == 0
    except (AssertionError, ImportError):
        return True


__all__ = ["CheckpointSource", "MixedPrecisionModelLoader", "load_enhanced_config", "prepare_plan"]
