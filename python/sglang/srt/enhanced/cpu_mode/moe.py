"""Route SGLang 0.4.7's unquantized fused MoE to its torch-native path on the CPU.

On a non-CUDA device ``UnquantizedFusedMoEMethod`` dispatches to
``forward_native``, which in 0.4.7 is the Triton ``fused_experts`` path. In CPU
mode the method's ``forward_native`` is replaced, before the model is built, by
one that calls SGLang's own ``moe_forward_native`` with every routing argument
(activation and ``routed_scaling_factor`` included, which ``forward_cpu`` drops).
"""

from __future__ import annotations

import logging

import torch

from sglang.srt.enhanced.errors import EnhancedError

logger = logging.getLogger(__name__)


def _forward_native_cpu(
    self,  # noqa: ANN001 - UnquantizedFusedMoEMethod
    layer: torch.nn.Module,
    x: torch.Tensor,
    use_grouped_topk: bool,
    top_k: int,
    router_logits: torch.Tensor,
    renormalize: bool,
    topk_group: int | None = None,
    num_expert_group: int | None = None,
    num_fused_shared_experts: int = 0,
    custom_routing_function=None,  # noqa: ANN001
    correction_bias: torch.Tensor | None = None,
    activation: str = "silu",
    apply_router_weight_on_input: bool = False,
    inplace: bool = True,
    no_combine: bool = False,
    routed_scaling_factor: float | None = None,
) -> torch.Tensor:
    from sglang.srt.layers.moe.fused_moe_native import moe_forward_native

    if apply_router_weight_on_input or no_combine:
        raise EnhancedError(
            "apply_router_weight_on_input / no_combine MoE is not supported in CPU mode",
            culprit=type(layer).__name__,
        )
    out = moe_forward_native(
        layer, x, use_grouped_topk, top_k, router_logits, renormalize,
        topk_group=topk_group, num_expert_group=num_expert_group,
        num_fused_shared_experts=num_fused_shared_experts,
        custom_routing_function=custom_routing_function, correction_bias=correction_bias,
        activation=activation, routed_scaling_factor=routed_scaling_factor,
    )
    return out.to(x.dtype)


def route_moe_to_native() -> None:
    """Make every unquantized FusedMoE built from now on run the torch-native path."""
    from sglang.srt.layers.moe.fused_moe_triton.layer import UnquantizedFusedMoEMethod

    if UnquantizedFusedMoEMethod.forward_native is not _forward_native_cpu:
        UnquantizedFusedMoEMethod.forward_native = _forward_native_cpu
        logger.debug("CPU mode: unquantized fused MoE routed to moe_forward_native")
