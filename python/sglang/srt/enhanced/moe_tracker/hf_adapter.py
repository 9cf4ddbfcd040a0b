"""Track expert routing of a Hugging Face transformers MoE model with forward hooks.

Supported: Qwen2-MoE, Qwen3-MoE, Mixtral, OLMoE (softmax top-k routers whose ``gate``
returns logits) and DeepSeek-V3 (grouped, biased top-k; its ``gate`` returns the chosen
ids). Any decoder whose ``layers.{i}`` holds a module with ``gate`` and ``experts``
submodules is handled the same way, so renamed classes keep working.

- A forward hook on each MoE ``gate`` turns its output into ``[tokens, top_k]`` expert ids:
  integer ids returned by the gate are used as they are; logits are routed the way these
  models do (softmax in float32, then top-k). Layer ``i`` is the block's place in
  ``layers``.
- The module owning ``layers`` gets a pre-hook (``begin_pass``) and an always-called
  post-hook (``end_pass``, or ``abort_pass`` when the forward raised). A pass is a decode
  pass when each sequence has one new token and the cache already holds tokens.
- Every token of the forward counts, padding tokens of a batch included.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from sglang.srt.enhanced.errors import EnhancedError
from sglang.srt.enhanced.moe_tracker.tracker import DEFAULT_MAX_TOKENS, ExpertActivationTracker

logger = logging.getLogger(__name__)

_NUM_EXPERTS_ATTRS = ("num_experts", "n_routed_experts", "num_local_experts")


@dataclasses.dataclass(frozen=True)
class MoeLayer:
    """One MoE block found in the model."""

    layer_id: int
    name: str
    block: nn.Module
    gate: nn.Module
    num_experts: int
    top_k: int


@dataclasses.dataclass
class TrackingHandle:
    """Hooks attached by :func:`attach_hf_model`; :meth:`remove` detaches them all."""

    tracker: ExpertActivationTracker
    layers: list[MoeLayer]
    _handles: list[RemovableHandle]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> TrackingHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def find_moe_layers(model: nn.Module) -> tuple[nn.Module, list[MoeLayer]]:
    """The module owning the decoder ``layers`` and the MoE blocks in them.

    The owner is the first module (in ``model.modules()`` order) with a non-empty ``layers``
    ``ModuleList`` holding at least one MoE block: a module with ``gate`` and ``experts``.
    """
    for owner in model.modules():
        layers = getattr(owner, "layers", None)
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            config = getattr(owner, "config", None) or getattr(model, "config", None)
            found = [m for i, layer in enumerate(layers) if (m := _moe_block(i, layer, config)) is not None]
            if found:
                return owner, found
    raise EnhancedError(
        "the model has no `layers` with an MoE block (a module with `gate` and `experts`)",
        culprit=type(model).__name__,
    )


def _moe_block(layer_id: int, layer: nn.Module, config: Any) -> MoeLayer | None:
    for name, module in layer.named_modules():
        gate, experts = getattr(module, "gate", None), getattr(module, "experts", None)
        if isinstance(gate, nn.Module) and isinstance(experts, nn.Module):
            return MoeLayer(
                layer_id=layer_id,
                name=f"layers.{layer_id}.{name}".rstrip("."),
                block=module,
                gate=gate,
                num_experts=_num_experts(module, gate, experts, config),
                top_k=_top_k(module, gate, config),
            )
    return None


def tracker_for_hf_model(
    model: nn.Module, *, max_tokens: int = DEFAULT_MAX_TOKENS, device: torch.device | str | None = None
) -> ExpertActivationTracker:
    """A tracker sized for ``model``'s MoE layers, on the device of the first router."""
    owner, moe = find_moe_layers(model)
    if device is None:
        param = next(moe[0].gate.parameters(), None)
        device = param.device if param is not None else "cpu"
    return ExpertActivationTracker(
        num_layers=len(owner.layers),
        num_experts=max(m.num_experts for m in moe),
        top_k=max(m.top_k for m in moe),
        max_tokens=max_tokens,
        device=device,
        layer_ids=[m.layer_id for m in moe],
    )


def attach_hf_model(model: nn.Module, tracker: ExpertActivationTracker | None = None) -> TrackingHandle:
    """Hook ``model`` so each forward records its routing into ``tracker``.

    Without ``tracker`` one is built by :func:`tracker_for_hf_model`. The returned handle's
    ``remove()`` detaches every hook.
    """
    owner, moe = find_moe_layers(model)
    if tracker is None:
        tracker = tracker_for_hf_model(model)
    _check_fits(tracker, moe)
    handles: list[RemovableHandle] = []
    depth = [0]

    def begin(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        depth[0] += 1
        if depth[0] > 1:
            return
        num_tokens, is_decode = _pass_shape(args, kwargs)
        if tracker.in_pass:
            tracker.abort_pass()
        tracker.begin_pass(num_tokens, is_decode)

    def end(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        depth[0] -= 1
        if depth[0] > 0:
            return
        if output is None:
            tracker.abort_pass()
        elif tracker.in_pass:
            tracker.end_pass()

    handles.append(owner.register_forward_pre_hook(begin, with_kwargs=True))
    handles.append(owner.register_forward_hook(end, with_kwargs=True, always_call=True))
    for layer in moe:
        handles.append(layer.gate.register_forward_hook(_gate_hook(tracker, layer)))
    logger.info("tracking %d MoE layers of %s", len(moe), type(model).__name__)
    return TrackingHandle(tracker=tracker, layers=moe, _handles=handles)


def _gate_hook(tracker: ExpertActivationTracker, layer: MoeLayer):
    layer_id, top_k, num_experts = layer.layer_id, layer.top_k, layer.num_experts

    def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if tracker.in_pass:
            tracker.record_routing(layer_id, routed_ids(output, top_k, num_experts, layer_id))

    return hook


def routed_ids(output: Any, top_k: int, num_experts: int, layer_id: int = -1) -> torch.Tensor:
    """``[tokens, top_k]`` expert ids from a router's output (integer ids, or logits)."""
    tensors = [
        t for t in (output if isinstance(output, (tuple, list)) else (output,)) if isinstance(t, torch.Tensor)
    ]
    for t in tensors:
        if not t.is_floating_point() and t.shape[-1] == top_k:
            return t.reshape(-1, top_k)
    for t in tensors:
        if t.is_floating_point() and t.shape[-1] == num_experts:
            probs = F.softmax(t.reshape(-1, num_experts), dim=-1, dtype=torch.float)
            return torch.topk(probs, top_k, dim=-1).indices
    raise EnhancedError(
        f"router output has no [*, {top_k}] ids nor [*, {num_experts}] logits", culprit=(layer_id, None)
    )


def _first_int(objects: Sequence[Any], attrs: Sequence[str]) -> int | None:
    for obj in objects:
        for attr in attrs:
            value = getattr(obj, attr, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def _num_experts(block: nn.Module, gate: nn.Module, experts: nn.Module, config: Any) -> int:
    value = _first_int((block, gate, experts), _NUM_EXPERTS_ATTRS)
    if value is None and isinstance(experts, nn.ModuleList):
        value = len(experts)
    if value is None:
        value = _first_int((config,), _NUM_EXPERTS_ATTRS)
    if value is None:
        raise EnhancedError("cannot tell the number of experts", culprit=type(block).__name__)
    return value


def _top_k(block: nn.Module, gate: nn.Module, config: Any) -> int:
    value = _first_int((block, gate, config), ("top_k", "num_experts_per_tok"))
    if value is None:
        raise EnhancedError("cannot tell the router's top-k", culprit=type(block).__name__)
    return value


def _check_fits(tracker: ExpertActivationTracker, moe: list[MoeLayer]) -> None:
    num_layers, num_experts, top_k = tracker.routing_shape
    for layer in moe:
        if layer.layer_id >= num_layers or layer.num_experts > num_experts or layer.top_k > top_k:
            raise EnhancedError(
                f"tracker sized (layers={num_layers}, experts={num_experts}, top_k={top_k}) cannot hold "
                f"{layer.name} (experts={layer.num_experts}, top_k={layer.top_k})",
                culprit=(layer.layer_id, None),
            )


def _pass_shape(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int, bool]:
    ids = kwargs.get("input_ids", args[0] if args else None)
    if isinstance(ids, torch.Tensor):
        num_tokens, seq_len = ids.numel(), ids.shape[-1]
    else:
        embeds = kwargs.get("inputs_embeds")
        if not isinstance(embeds, torch.Tensor):
            raise EnhancedError("forward has neither input_ids nor inputs_embeds", culprit="input_ids")
        num_tokens, seq_len = embeds.shape[:-1].numel(), embeds.shape[-2]
    return num_tokens, seq_len == 1 and _cache_length(kwargs.get("past_key_values")) > 0


def _cache_length(cache: Any) -> int:
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    if isinstance(cache, (tuple, list)) and cache and cache[0] is not None:
        return int(cache[0][0].shape[-2])
    return 0
