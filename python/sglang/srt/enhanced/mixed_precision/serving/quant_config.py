"""The SGLang ``QuantizationConfig`` of a serving layout: one method per module.

SGLang asks ``get_quant_method(layer, prefix)`` of every Linear, FusedMoE, embedding and
attention module it builds. Packed modules of the layout get :class:`PackedLinearMethod`
/ :class:`PackedMoEMethod` (:class:`PackedMixedMoEMethod` for a FusedMoE whose experts come in
several formats); every other Linear / FusedMoE gets SGLang's own unquantized
method (decoded modules too: their weights arrive decoded), with one warning per decoded
module naming it, its precisions and why. Embeddings and attention keep their defaults.
Each decision is recorded in :attr:`PackedQuantConfig.assigned` for the load report.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sglang.srt.enhanced.mixed_precision.serving.layout import ModuleLayout, ServingLayout
from sglang.srt.layers.linear import LinearBase, UnquantizedLinearMethod
from sglang.srt.layers.moe.fused_moe_triton.layer import FusedMoE, UnquantizedFusedMoEMethod
from sglang.srt.layers.quantization.base_config import QuantizationConfig, QuantizeMethodBase

logger = logging.getLogger(__name__)

__all__ = ["AssignedMethod", "PackedQuantConfig"]


@dataclass(frozen=True)
class AssignedMethod:
    """The method one SGLang module got: ``unquantized``, ``decoded`` or a packed format's name."""

    prefix: str
    kind: str  # "linear" or "moe"
    method: str
    layout: ModuleLayout | None


class PackedQuantConfig(QuantizationConfig):
    """Quantization config built from a :class:`ServingLayout` (not from a checkpoint's config file)."""

    def __init__(self, layout: ServingLayout, *, warn: bool = True) -> None:
        super().__init__()
        self.layout = layout
        self.warn = warn
        self.assigned: dict[str, AssignedMethod] = {}

    def get_name(self) -> str:
        return "sglang_enhanced_packed"

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return 0

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> PackedQuantConfig:
        raise NotImplementedError("built from a serving layout, never from a checkpoint config")

    def get_scaled_act_names(self) -> list[str]:
        return []

    def get_quant_method(self, layer: nn.Module, prefix: str) -> QuantizeMethodBase | None:
        from sglang.srt.enhanced.mixed_precision.serving.methods import (
            PackedLinearMethod,
            PackedMixedMoEMethod,
            PackedMoEMethod,
        )

        if isinstance(layer, FusedMoE):
            kind, packed, unquantized = "moe", PackedMoEMethod, UnquantizedFusedMoEMethod
        elif isinstance(layer, LinearBase):
            kind, packed, unquantized = "linear", PackedLinearMethod, UnquantizedLinearMethod
        else:
            return None
        module = self.layout.find(prefix)
        if module is not None and module.kind == kind and module.method == "packed":
            self.assigned[module.name] = AssignedMethod(module.name, kind, module.method_name, module)
            return PackedMixedMoEMethod(module) if module.is_mixed else packed(module)
        name = module.name if module is not None else prefix
        method = "decoded" if module is not None else "unquantized"
        self.assigned[name] = AssignedMethod(name, kind, method, module)
        if module is not None and self.warn and self.layout.serve == "packed":
            logger.warning("%s is served decoded (precisions %s): %s", module.name,
                           ", ".join(str(p) for p in module.precisions), module.reason)
        return unquantized()
