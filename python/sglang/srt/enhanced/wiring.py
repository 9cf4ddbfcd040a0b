"""How the launcher composes the two features inside SGLang's scheduler processes.

SGLang builds the model in each (spawned) scheduler process through the loader class
given as ``ServerArgs.load_format``; the class is imported there by name, so what it
does reaches every process. Mixed-precision loading and expert tracking stay unaware
of each other: this loader runs the one, then installs the other when enabled.
"""

from __future__ import annotations

from torch import nn

from sglang.srt.configs.device_config import DeviceConfig
from sglang.srt.configs.model_config import ModelConfig
from sglang.srt.enhanced.mixed_precision.sglang_loader import MixedPrecisionModelLoader

__all__ = ["EnhancedServerLoader"]


class EnhancedServerLoader(MixedPrecisionModelLoader):
    """The mixed-precision load, then (with ``--enable-expert-tracking``) the tracking recorder."""

    def load_model(self, *, model_config: ModelConfig, device_config: DeviceConfig) -> nn.Module:
        model = super().load_model(model_config=model_config, device_config=device_config)
        if self.settings.expert_tracking:
            from sglang.srt.enhanced.moe_tracker.sglang_adapter import install_tracking_recorder

            install_tracking_recorder(model, model_config, self.settings)
        return model
