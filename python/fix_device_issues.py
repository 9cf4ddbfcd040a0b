"""Device-consistency helpers for transformers MoE models: ``from fix_device_issues import ...``.

The implementation lives in ``sglang.srt.enhanced.device_fix``.
"""

from sglang.srt.enhanced.device_fix import (
    DeviceFixReport,
    comprehensive_device_fix,
    create_proper_attention_mask,
    find_moe_blocks,
    fix_moe_device_issues,
    is_moe_block,
    move_moe_blocks,
    resolve_device,
    validate_model_device_consistency,
)
from sglang.srt.enhanced.errors import EnhancedError

__all__ = [
    "DeviceFixReport",
    "EnhancedError",
    "comprehensive_device_fix",
    "create_proper_attention_mask",
    "find_moe_blocks",
    "fix_moe_device_issues",
    "is_moe_block",
    "move_moe_blocks",
    "resolve_device",
    "validate_model_device_consistency",
]
