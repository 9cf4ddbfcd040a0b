"""Device-consistency helpers for transformers MoE models used from Python.

They answer two errors users meet when a model is loaded, partly offloaded or moved by hand:

* "Expected all tensors to be on the same device, but found at least two devices, cuda:0 and cpu!"
  ``validate_model_device_consistency`` names every parameter and buffer that is off the target
  device; ``fix_moe_device_issues`` and ``comprehensive_device_fix`` move them.
* "The attention mask is not set and cannot be inferred from input because pad token is same as
  eos token." ``create_proper_attention_mask`` builds the mask from the padded ids.

Modules managed by accelerate hooks (an ``_hf_hook`` attribute on the module or an ancestor, as
``device_map=...`` loading and ``cpu_offload`` attach) are never moved: the hook decides where
their weights live, and moving them would break it. They are reported instead.

Devices are compared by type and index, with an index-less device meaning the current one, so
``"cuda"`` and ``"cuda:0"`` are the same while device 0 is current.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from sglang.srt.enhanced.errors import EnhancedError

logger = logging.getLogger(__name__)

DeviceLike = str | torch.device | int

_HOOK_ATTR = "_hf_hook"
_ROUTER_NAMES = ("gate", "router")


# --------------------------------------------------------------------------- devices


def resolve_device(device: DeviceLike) -> torch.device:
    """Parse ``device`` and check it exists here; an index-less accelerator gets the current index.

    Raises ``EnhancedError`` (culprit: the device as given) for an unknown device string or a
    device this machine does not have. ``"meta"`` is always accepted.
    """
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as e:
        raise EnhancedError(f"unknown device {device!r}", culprit=device) from e
    if dev.type in ("cpu", "meta"):
        return torch.device(dev.type)
    backend = getattr(torch, dev.type, None)
    is_available = getattr(backend, "is_available", None)
    if is_available is None or not is_available():
        raise EnhancedError(f"device {str(dev)!r} is not available on this machine", culprit=device)
    count = backend.device_count() if hasattr(backend, "device_count") else 1
    index = dev.index if dev.index is not None else _current_index(dev.type)
    if index >= count:
        raise EnhancedError(
            f"device {str(dev)!r} is not available on this machine ({count} {dev.type} device(s))",
            culprit=device,
        )
    return torch.device(dev.type, index)


def _current_index(device_type: str) -> int:
    backend = getattr(torch, device_type, None)
    current = getattr(backend, "current_device", None)
    return int(current()) if current is not None else 0


def _same_device(found: torch.device, target: torch.device) -> bool:
    """``target`` comes from ``resolve_device``; ``found`` is a tensor's device."""
    if found.type != target.type:
        return False
    if target.index is None:
        return True
    index = found.index if found.index is not None else _current_index(found.type)
    return index == target.index


# --------------------------------------------------------------------------- model traversal


@dataclass
class _TensorSlot:
    """One registered parameter or buffer, with every module slot that holds it."""

    name: str
    kind: str  # "parameter" | "buffer"
    tensor: torch.Tensor
    hook_owner: str | None  # the nearest module (itself or an ancestor) carrying an accelerate hook
    moe_block: str | None  # the enclosing MoE block
    holders: list[tuple[nn.Module, str]] = field(default_factory=list)


def is_moe_block(module: nn.Module) -> bool:
    """True for a sparse MoE block: a module with an ``experts`` child and a ``gate``/``router`` child.

    This covers Qwen2-MoE, Qwen3-MoE, Mixtral, OLMoE and DeepSeek-V3 blocks in transformers 4.x
    (experts as a ``ModuleList``) and 5.x (fused expert modules, router classes).
    """
    children = module._modules
    return children.get("experts") is not None and any(children.get(n) is not None for n in _ROUTER_NAMES)


def find_moe_blocks(model: nn.Module) -> list[str]:
    """Names (as in ``model.named_modules()``) of the outermost MoE blocks in ``model``."""
    found: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(f"{b}.") for b in found):
            continue
        if is_moe_block(module):
            found.append(name)
    return found


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _iter_slots(model: nn.Module) -> Iterator[_TensorSlot]:
    """Every distinct registered tensor of ``model`` (tied ones once, with all their holders)."""
    slots: dict[int, _TensorSlot] = {}
    order: list[int] = []

    def visit(module: nn.Module, prefix: str, hook_owner: str | None, moe_block: str | None,
              seen: set[int]) -> None:
        if id(module) in seen:
            return
        seen.add(id(module))
        if hasattr(module, _HOOK_ATTR):
            hook_owner = prefix
        if moe_block is None and is_moe_block(module):
            moe_block = prefix
        for kind, tensors in (("parameter", module._parameters), ("buffer", module._buffers)):
            for local, tensor in tensors.items():
                if tensor is None:
                    continue
                slot = slots.get(id(tensor))
                if slot is None:
                    slot = _TensorSlot(_join(prefix, local), kind, tensor, hook_owner, moe_block)
                    slots[id(tensor)] = slot
                    order.append(id(tensor))
                slot.holders.append((module, local))
        for child_name, child in module._modules.items():
            if child is not None:
                visit(child, _join(prefix, child_name), hook_owner, moe_block, seen)

    visit(model, "", None, None, set())
    for key in order:
        yield slots[key]


# --------------------------------------------------------------------------- validation


def validate_model_device_consistency(model: nn.Module, device: DeviceLike) -> dict[str, Any]:
    """Check that every parameter and buffer of ``model`` is on ``device``.

    Buffers include non-persistent ones (rotary ``inv_freq`` caches), which ``state_dict`` omits.
    Returns ``{"is_consistent": bool, "device": str, "issues": [...]}`` where each issue is a dict
    ``{"name", "kind" ("parameter" | "buffer"), "device" (where it is), "offloaded" (bool: managed
    by an accelerate hook, so it is expected to be elsewhere between forward passes)}``.
    ``is_consistent`` is False exactly when ``issues`` is non-empty.
    """
    target = resolve_device(device)
    issues = [
        {"name": s.name, "kind": s.kind, "device": str(s.tensor.device), "offloaded": s.hook_owner is not None}
        for s in _iter_slots(model)
        if not _same_device(s.tensor.device, target)
    ]
    return {"is_consistent": not issues, "device": str(target), "issues": issues}


# --------------------------------------------------------------------------- moving


@dataclass
class DeviceFixReport:
    """What a fix changed: tensors moved (names) and hook-managed modules left alone."""

    device: str
    moved: list[str] = field(default_factory=list)
    skipped_offloaded: list[str] = field(default_factory=list)


def _move_slot(slot: _TensorSlot, target: torch.device) -> None:
    old = slot.tensor
    with torch.no_grad():
        moved = old.to(target)
        if isinstance(old, nn.Parameter):
            if torch._has_compatible_shallow_copy_type(old, moved):
                old.data = moved  # keeps the Parameter object, so tied weights stay tied
            else:  # e.g. cpu <-> meta: swap contents, still keeping the object's identity
                torch.utils.swap_tensors(old, nn.Parameter(moved, requires_grad=old.requires_grad))
            if old.grad is not None:
                old.grad = old.grad.to(target)
            return
    for module, local in slot.holders:
        module._buffers[local] = moved


def _move_off_device(model: nn.Module, target: torch.device, *, moe_only: bool) -> DeviceFixReport:
    """Move every off-device tensor in scope (MoE blocks, or the whole model) to ``target``."""
    report = DeviceFixReport(device=str(target))
    to_move: list[_TensorSlot] = []
    for slot in _iter_slots(model):
        if moe_only and slot.moe_block is None:
            continue
        if _same_device(slot.tensor.device, target):
            continue
        if slot.hook_owner is not None:
            if slot.hook_owner not in report.skipped_offloaded:
                report.skipped_offloaded.append(slot.hook_owner)
            continue
        if slot.tensor.is_meta and target.type != "meta":
            raise EnhancedError(
                f"{slot.kind} has no data (it is on the meta device); load its weights instead of moving it",
                culprit=slot.name,
            )
        to_move.append(slot)
    for slot in to_move:
        logger.debug("moving %s %s from %s to %s", slot.kind, slot.name, slot.tensor.device, target)
        _move_slot(slot, target)
        report.moved.append(slot.name)
    if report.skipped_offloaded:
        shown = ", ".join(repr(n) for n in report.skipped_offloaded[:5])
        more = len(report.skipped_offloaded) - 5
        logger.warning(
            "left %d accelerate-hooked module(s) with tensors off %s in place: %s%s",
            len(report.skipped_offloaded), target, shown, f" and {more} more" if more > 0 else "",
        )
    if report.moved:
        logger.info("moved %d tensor(s) to %s", len(report.moved), target)
    return report


def move_moe_blocks(model: nn.Module, device: DeviceLike) -> DeviceFixReport:
    """Move the MoE blocks of ``model`` (routers, experts, shared experts, their buffers) to ``device``.

    Tensors keep their dtype and their ``Parameter`` objects (tied weights stay tied). Modules
    under an accelerate hook are not moved; they are logged at WARNING and listed in the report's
    ``skipped_offloaded`` (module names; the model itself is ``""``). A tensor on the meta device
    cannot be moved to a real device: ``EnhancedError`` names it and nothing is moved.
    """
    return _move_off_device(model, resolve_device(device), moe_only=True)


def fix_moe_device_issues(model: nn.Module, device: DeviceLike) -> nn.Module:
    """Move the MoE blocks of ``model`` to ``device`` in place and return ``model``.

    See ``move_moe_blocks`` (which also returns what was moved and skipped).
    """
    move_moe_blocks(model, device)
    return model


# --------------------------------------------------------------------------- attention mask


def create_proper_attention_mask(
    input_ids: torch.Tensor | Sequence[Sequence[int]],
    tokenizer: Any,
    device: DeviceLike,
    lengths: torch.Tensor | Sequence[int] | None = None,
) -> torch.Tensor:
    """Attention mask (1 = real token, 0 = padding, dtype long) for padded ``input_ids``, on ``device``.

    ``input_ids`` is ``[batch, seq]`` (or ``[seq]``, giving a ``[seq]`` mask); padding is on
    ``tokenizer.padding_side`` ("right" when the tokenizer has none).

    * ``lengths`` given: the first (right padding) or last (left padding) ``lengths[i]`` positions
      of row ``i`` are real. Exact; use it when you know the lengths.
    * no pad token: nothing is padding.
    * pad token differs from eos: mask = ``input_ids != pad``.
    * pad token equals eos: ids alone cannot tell a pad from a genuine eos next to the padding, so
      only the run of pad ids at the padded edge is considered and eos ids anywhere else are real.
      Right padding: the first id of the trailing run is kept as the sequence's own eos, the rest
      is padding. If the text did not end in eos, one pad position stays visible; under causal
      attention a trailing position never changes the outputs at earlier positions, whereas masking
      a genuine final eos would. Left padding: the whole leading run is padding (a visible pad there
      would change every later position), except its last id when the tokenizer prepends a bos
      equal to the pad id (``add_bos_token`` and ``bos_token_id == pad_token_id``).
      A row made only of pad ids keeps one position, so no row is fully masked.
    """
    target = resolve_device(device)
    ids = torch.as_tensor(input_ids)
    squeeze = ids.dim() == 1
    if squeeze:
        ids = ids.unsqueeze(0)
    if ids.dim() != 2:
        raise EnhancedError(f"input_ids must be [batch, seq] or [seq], got shape {tuple(ids.shape)}",
                            culprit="input_ids")
    side = getattr(tokenizer, "padding_side", None) or "right"
    if side not in ("left", "right"):
        raise EnhancedError(f"padding_side must be 'left' or 'right', got {side!r}", culprit="padding_side")
    batch, seq = ids.shape
    positions = torch.arange(seq, device=ids.device)

    if lengths is not None:
        real = torch.as_tensor(lengths, device=ids.device).reshape(-1)
        if real.numel() != batch or bool((real < 0).any()) or bool((real > seq).any()):
            raise EnhancedError(f"lengths must be {batch} values in [0, {seq}], got {real.tolist()}",
                                culprit="lengths")
        mask = positions < real[:, None] if side == "right" else positions >= (seq - real)[:, None]
    else:
        pad_id = getattr(tokenizer, "pad_token_id", None)
        eos_id = getattr(tokenizer, "eos_token_id", None)
        if pad_id is None:
            mask = torch.ones_like(ids, dtype=torch.bool)
        elif pad_id != eos_id:
            mask = ids != pad_id
        else:
            mask = _mask_pad_equals_eos(ids, pad_id, side, _prepends_pad_bos(tokenizer, pad_id))
    mask = mask.to(device=target, dtype=torch.long)
    return mask[0] if squeeze else mask


def _prepends_pad_bos(tokenizer: Any, pad_id: int) -> bool:
    return bool(getattr(tokenizer, "add_bos_token", False)) and getattr(tokenizer, "bos_token_id", None) == pad_id


def _mask_pad_equals_eos(ids: torch.Tensor, pad_id: int, side: str, keep_leading_bos: bool) -> torch.Tensor:
    seq = ids.shape[1]
    positions = torch.arange(seq, device=ids.device)
    is_pad = (ids == pad_id).to(torch.int64)
    if side == "right":
        run = torch.cumprod(is_pad.flip(1), dim=1).sum(dim=1)  # trailing run of pad ids
        padding = (run - 1).clamp(min=0)
        return positions < (seq - padding)[:, None]
    run = torch.cumprod(is_pad, dim=1).sum(dim=1)  # leading run of pad ids
    padding = (run - 1).clamp(min=0) if keep_leading_bos else run.clamp(max=seq - 1)
    return positions >= padding[:, None]


# --------------------------------------------------------------------------- everything at once


def comprehensive_device_fix(model: nn.Module, tokenizer: Any, device: DeviceLike) -> dict[str, Any]:
    """Make ``model`` usable on ``device``: move stray tensors there and give the tokenizer a pad token.

    * every parameter and buffer of the model that is off ``device`` is moved (in place, dtype and
      ``Parameter`` objects kept), except in modules under accelerate hooks, which are reported;
    * if ``tokenizer`` (may be None) has no pad token, its eos token becomes the pad token;
    * if ``model.generation_config.pad_token_id`` is unset, it is set to the tokenizer's pad id.

    Returns ``{"device", "moved" (tensor names), "skipped_offloaded" (hook-managed module names),
    "pad_token_set" (bool), "pad_token_id", "generation_pad_token_id_set" (bool),
    "remaining_issues" (validation issues left, e.g. offloaded tensors), "is_consistent"}``.
    Since pad then equals eos, build attention masks with ``create_proper_attention_mask``.
    """
    target = resolve_device(device)
    report = _move_off_device(model, target, moe_only=False)

    pad_token_set = False
    pad_id = None
    if tokenizer is not None:
        if getattr(tokenizer, "pad_token_id", None) is None:
            if getattr(tokenizer, "eos_token", None) is None:
                logger.warning("tokenizer has neither a pad nor an eos token; pad token left unset")
            else:
                tokenizer.pad_token = tokenizer.eos_token
                pad_token_set = True
                logger.info("set the tokenizer's pad token to its eos token %r", tokenizer.eos_token)
        pad_id = getattr(tokenizer, "pad_token_id", None)

    generation_set = False
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and pad_id is not None and generation_config.pad_token_id is None:
        generation_config.pad_token_id = pad_id
        generation_set = True

    validation = validate_model_device_consistency(model, target)
    return {
        "device": str(target),
        "moved": report.moved,
        "skipped_offloaded": report.skipped_offloaded,
        "pad_token_set": pad_token_set,
        "pad_token_id": pad_id,
        "generation_pad_token_id_set": generation_set,
        "remaining_issues": validation["issues"],
        "is_consistent": validation["is_consistent"],
    }


__all__ = [
    "DeviceFixReport",
    "comprehensive_device_fix",
    "create_proper_attention_mask",
    "find_moe_blocks",
    "fix_moe_device_issues",
    "is_moe_block",
    "move_moe_blocks",
    "resolve_device",
    "validate_model_device_consistency",
]
