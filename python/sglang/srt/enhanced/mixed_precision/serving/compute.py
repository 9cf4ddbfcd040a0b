"""Multiply activations by packed weights: the one place that picks an implementation.

* CUDA: the fused kernels of ``kernels.fused_moe`` / ``kernels.packed_linear`` (imported
  lazily; for MoE below ``LOOP_FROM_TOKENS`` tokens or inside graph capture); where they are
  not installed, or a weight has a layout they do not take (fused linear parts with different
  act-order ``g_idx``), or a MoE call has more tokens, the Triton dequant kernels decode what
  the call needs and a matmul follows;
* elsewhere (the CPU server of CI): the torch references decode what the call needs (for
  MoE only the experts the tokens were routed to) in the serving dtype, then matmul.

Packed GPTQ and FP8 weights are described once, by ``kernels.packed_weights`` (``GPTQExperts``,
``FP8Experts``): the methods build them after loading and the kernels take them as they are.

A FusedMoE whose experts come in several formats holds one stacked set per format and slot
(:class:`MixedExperts`): the fused kernels run once per set over the pairs routed to its
experts (each launch maps the global ids through the set's device-side map: no host sync);
bf16 experts go through the per-channel FP8 kernel path with unit scales (its tiles read any
float dtype). The CPU loop decodes each routed expert from its own set.

The expert loop mirrors SGLang's torch-native MoE (tokens sorted by expert, ``F.linear``,
the activation-and-multiply, weights combined in the routing weights' dtype), so a packed
MoE layer gives the decoded layer's numbers up to matmul blocking.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from types import ModuleType

import torch
import torch.nn.functional as F

from sglang.srt.enhanced.errors import EnhancedError
from sglang.srt.enhanced.mixed_precision.dequant import dequant_fp8_block, dequant_fp8_scaled, dequant_gptq
from sglang.srt.enhanced.mixed_precision.kernels.act_order import sort_act_order, unsort_rows
from sglang.srt.enhanced.mixed_precision.kernels.packed_weights import FP8Experts, GPTQExperts
from sglang.srt.enhanced.mixed_precision.packing import block_shape

logger = logging.getLogger(__name__)

__all__ = ["LOOP_FROM_TOKENS", "MixedExperts", "PlainWeights", "decode", "gptq_loaded", "moe_forward",
           "moe_fused_kernels", "packed_linear"]

# From this many tokens on (outside CUDA-graph capture) a CUDA MoE call decodes each routed expert
# once and multiplies its tokens with cuBLAS instead of calling the fused kernels, whose large-batch
# path is several times slower than bf16 (benchmarks/RESULTS.md, fused MoE section: 5.9 ms against
# 0.88 ms for bf16 at 4096 tokens on Qwen3-30B-A3B's shape). The crossover is estimated from the
# measured decode rate, not measured itself.
LOOP_FROM_TOKENS = 1024


@dataclass(frozen=True)
class PlainWeights:
    """Unquantized stacked experts ``[E, N, K]`` (the bf16 experts of a mixed layer).

    ``unit_scale`` is one float32 1.0 viewed as ``[E, N]`` (stride 0): the per-channel scale
    with which the FP8 kernels multiply these weights unchanged.
    """

    weight: torch.Tensor
    unit_scale: torch.Tensor

    @classmethod
    def loaded(cls, weight: torch.Tensor) -> PlainWeights:
        one = torch.ones((1, 1), dtype=torch.float32, device=weight.device)
        return cls(weight, one.expand(*weight.shape[:-1]))

    def expert(self, e: int) -> PlainWeights:
        return PlainWeights(self.weight[e], self.unit_scale[e])


def gptq_loaded(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor | None,
                bits: int, group_size: int, zero_offset: int, bounds: tuple[int, ...]) -> GPTQExperts:
    """Packed GPTQ weights from loaded tensors, ``g_idx`` as loaded ``[..., P, K]`` (one row per fused part).

    Where every part has the same order (decided here, once) ``g_idx`` becomes one ``[..., K]`` row.
    On CUDA an act-order weight's rows are then sorted by group in place (``act_order``): the fused
    kernels read it as a plain one, with its activations gathered.
    """
    if g_idx is not None and bool((g_idx == g_idx[..., :1, :]).all()):
        g_idx = g_idx[..., 0, :]
    w = GPTQExperts(qweight, qzeros, scales, g_idx, bits, group_size, zero_offset, bounds)
    return sort_act_order(w, in_place=True) if qweight.is_cuda else w


def decode(w: GPTQExperts | FP8Experts | PlainWeights, dtype: torch.dtype) -> torch.Tensor:
    """The float weight ``[..., N, K]`` in ``dtype``."""
    if isinstance(w, PlainWeights):
        return w.weight.to(dtype)
    if isinstance(w, FP8Experts):
        if w.block_size is not None:
            return dequant_fp8_block(w.weight, w.scale, w.block_size, dtype)
        return dequant_fp8_scaled(w.weight, w.scale.reshape(*w.scale.shape, 1), dtype)
    kwargs = dict(bits=w.bits, group_size=w.group_size, zero_offset=w.zero_offset, out_dtype=dtype)
    if w.perm is not None:  # rows sorted at load: decode them as stored, then put them back in order
        return unsort_rows(dequant_gptq(w.qweight, w.qzeros, w.scales, None, **kwargs), w)
    if not w.g_idx_per_part:
        return dequant_gptq(w.qweight, w.qzeros, w.scales, w.g_idx, **kwargs)  # type: ignore[arg-type]
    values, words = block_shape(w.bits)
    pieces = []
    for p in range(len(w.bounds) - 1):
        lo, hi = w.bounds[p], w.bounds[p + 1]
        pieces.append(dequant_gptq(
            w.qweight[..., lo:hi].contiguous(),
            w.qzeros[..., lo // values * words : hi // values * words].contiguous(),
            w.scales[..., lo:hi].contiguous(), w.g_idx[..., p, :].contiguous(),  # type: ignore[index]
            **kwargs,
        ))
    return torch.cat(pieces, dim=-2)


Weights = GPTQExperts | FP8Experts


@dataclass(frozen=True)
class MixedExperts:
    """One slot (``w13`` or ``w2``) of a FusedMoE whose experts come in several formats.

    ``sets[s]`` stacks the experts ``experts[s]`` (global ids, ascending); ``maps[s, e]``
    (int32, on the weights' device) is expert ``e``'s index in set ``s`` or -1: the fused
    kernels read it to pick each set's pairs.
    """

    sets: tuple[Weights | PlainWeights, ...]
    experts: tuple[tuple[int, ...], ...]
    maps: torch.Tensor
    num_experts: int

    @classmethod
    def build(cls, sets: tuple[Weights | PlainWeights, ...], experts: tuple[tuple[int, ...], ...],
              num_experts: int, device: torch.device) -> MixedExperts:
        maps = torch.full((len(sets), num_experts), -1, dtype=torch.int32)
        for s, ids in enumerate(experts):
            maps[s, list(ids)] = torch.arange(len(ids), dtype=torch.int32)
        return cls(sets, experts, maps.to(device), num_experts)

    def expert(self, e: int) -> Weights | PlainWeights:
        for s, ids in enumerate(self.experts):
            if e in ids:
                return self.sets[s].expert(ids.index(e))
        raise EnhancedError(f"expert {e} is in none of this layer's expert sets", culprit=f"expert {e}")


Experts = Weights | PlainWeights | MixedExperts


def _num_experts(w: Experts) -> int:
    if isinstance(w, MixedExperts):
        return w.num_experts
    return w.qweight.shape[0] if isinstance(w, GPTQExperts) else w.weight.shape[0]


def _fused_kernels() -> tuple[ModuleType, ModuleType] | None:
    """``(fused_moe, packed_linear)`` of the kernels package, or None when absent."""
    try:
        from sglang.srt.enhanced.mixed_precision.kernels import fused_moe, packed_linear
    except ImportError:
        return None
    return fused_moe, packed_linear


def _kernel_weights(w: Weights | PlainWeights) -> GPTQExperts | FP8Experts | None:
    """What the kernels take for ``w``, or None when they cannot take it."""
    if isinstance(w, PlainWeights):
        return FP8Experts(weight=w.weight, scale=w.unit_scale, block_size=None)
    if isinstance(w, GPTQExperts) and w.g_idx_per_part:
        # Only a stacked gate/up weight may carry two row orders (one per half).
        return w if w.qweight.dim() == 3 and w.row_order.shape[1] == 2 else None
    return w


def packed_linear(x: torch.Tensor, w: Weights, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ W.T + bias`` for a packed weight ``W``, output in ``x.dtype``."""
    if x.is_cuda:
        kernels = _fused_kernels()
        kw = _kernel_weights(w)
        if kernels is not None and kw is not None:
            linear = kernels[1]
            fn = linear.fp8_linear if isinstance(w, FP8Experts) else linear.gptq_linear
            return fn(x, kw, bias=bias)
    return F.linear(x, decode(w, x.dtype), bias)


def _kernel_sets(w: Experts) -> list | None:
    """``[(kernel weights, expert map or None)]`` of one slot, or None when a set does not fit the kernels."""
    if isinstance(w, MixedExperts):
        out = []
        for s, weights in enumerate(w.sets):
            kw = _kernel_weights(weights)
            if kw is None:
                return None
            out.append((kw, w.maps[s]))
        return out
    kw = _kernel_weights(w)
    return None if kw is None else [(kw, None)]


def moe_fused_kernels(
    x: torch.Tensor, w13: Experts, w2: Experts, topk_weights: torch.Tensor, topk_ids: torch.Tensor, activation: str
) -> torch.Tensor | None:
    """The fused kernels' result (one launch per expert set and projection), or None when they cannot take it."""
    kernels = _fused_kernels()
    if kernels is None:
        return None
    fused, _ = kernels
    k13, k2 = _kernel_sets(w13), _kernel_sets(w2)
    if k13 is None or k2 is None:
        return None
    return fused.fused_moe_sets(x, k13, k2, topk_weights.to(torch.float32), topk_ids.to(torch.int32),
                                activation=activation)


def moe_forward(
    x: torch.Tensor,
    w13: Experts,
    w2: Experts,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    activation: str,
) -> torch.Tensor:
    """Sum over the routed experts of ``topk_weight * down(act(gate) * up)``, shape ``[T, H]`` in ``x.dtype``."""
    if activation not in ("silu", "gelu"):
        raise EnhancedError(f"unsupported MoE activation {activation!r}; packed MoE runs silu or gelu",
                            culprit="activation")
    capturing = x.is_cuda and torch.cuda.is_current_stream_capturing()
    if x.is_cuda and (capturing or x.shape[0] < LOOP_FROM_TOKENS):
        out = moe_fused_kernels(x, w13, w2, topk_weights, topk_ids, activation)
        if out is not None:
            return out
    if capturing:
        return _moe_every_expert(x, w13, w2, topk_weights, topk_ids, activation)
    return _moe_expert_loop(x, w13, w2, topk_weights, topk_ids, activation)


def _expert_mlp(tokens: torch.Tensor, w13: Experts, w2: Experts, expert: int, activation: str) -> torch.Tensor:
    gate_up = F.linear(tokens, decode(w13.expert(expert), tokens.dtype))
    half = gate_up.shape[-1] // 2
    gate = gate_up[..., :half]
    act = F.silu(gate) if activation == "silu" else F.gelu(gate, approximate="tanh")
    return F.linear(act * gate_up[..., half:], decode(w2.expert(expert), tokens.dtype))


def _moe_every_expert(
    x: torch.Tensor, w13: Experts, w2: Experts, topk_weights: torch.Tensor, topk_ids: torch.Tensor, activation: str
) -> torch.Tensor:
    """Capture-safe (no host sync): every expert runs on every token, weighted by its routing weight (0 if unrouted)."""
    out = torch.zeros(x.shape[0], x.shape[-1], dtype=torch.float32, device=x.device)
    for expert in range(_num_experts(w13)):
        weight = (topk_weights * (topk_ids == expert)).sum(dim=-1, keepdim=True).to(torch.float32)
        out += weight * _expert_mlp(x, w13, w2, expert, activation).to(torch.float32)
    return out.to(x.dtype)


def _moe_expert_loop(
    x: torch.Tensor, w13: Experts, w2: Experts, topk_weights: torch.Tensor, topk_ids: torch.Tensor, activation: str
) -> torch.Tensor:
    """Decode each routed expert's weights, then the torch-native expert computation."""
    num_tokens, top_k = topk_ids.shape
    flat = topk_ids.reshape(-1).to(torch.int64)
    order = flat.argsort()
    sorted_tokens = x[order // top_k]
    experts, counts = torch.unique_consecutive(flat[order], return_counts=True)
    outputs = []
    start = 0
    for expert, count in zip(experts.tolist(), counts.tolist(), strict=True):
        outputs.append(_expert_mlp(sorted_tokens[start : start + count], w13, w2, expert, activation))
        start += count
    outs = torch.cat(outputs, dim=0) if outputs else sorted_tokens.new_empty(0, x.shape[-1])
    unsorted = torch.empty_like(outs)
    unsorted[order] = outs
    combined = (
        unsorted.view(num_tokens, top_k, -1).type(topk_weights.dtype).mul_(topk_weights.unsqueeze(-1)).sum(dim=1)
    )
    return combined.type(x.dtype)
