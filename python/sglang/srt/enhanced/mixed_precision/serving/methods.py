"""SGLang quantization methods that keep GPTQ and FP8 weights packed: Linear and FusedMoE.

``create_weights`` registers this rank's packed tensors under the names the model's own
``load_weights`` maps checkpoint tensors to (``qkv_proj.qweight``, ``experts.w13_scales``,
``experts.w2_weight_scale_inv`` ...), each with a ``weight_loader`` that cuts the stored
tensor the way SGLang shards the float weight (:mod:`.sharding`) and places it at its
fused part. ``process_weights_after_loading`` refuses a module not completely loaded,
drops an identity ``g_idx`` and settles the zero convention. ``apply`` goes through
:mod:`.compute`; MoE routing is SGLang's ``select_experts``, with the layer's settings.

A packed-mixed FusedMoE (experts in several formats, :class:`PackedMixedMoEMethod`) keeps
one parameter set per expert set, stacked over that set's experts only. The first set of a
slot to use a name takes the name the checkpoint maps to (``w13_qweight``, ``w13_weight``
...); a later set using the same name gets a tagged one (``w13_fp8_block32x32_weight``).
Every parameter shares one loader that sends each tensor to the set holding its expert.
"""

from __future__ import annotations

import itertools
import logging
import math
from typing import Any

import torch
from torch import nn

from sglang.srt.enhanced.errors import EnhancedError
from sglang.srt.enhanced.mixed_precision.formats.fp8 import FP8Scale
from sglang.srt.enhanced.mixed_precision.formats.gptq import is_trivial_g_idx, stored_zeros_look_v2
from sglang.srt.enhanced.mixed_precision.kernels.packed_weights import FP8Experts, GPTQExperts
from sglang.srt.enhanced.mixed_precision.packing import block_shape
from sglang.srt.enhanced.mixed_precision.plan import PlanEntry
from sglang.srt.enhanced.mixed_precision.serving.compute import (
    MixedExperts,
    PlainWeights,
    gptq_loaded,
    moe_forward,
    packed_linear,
)
from sglang.srt.enhanced.mixed_precision.serving.layout import ModuleLayout, gptq_groups
from sglang.srt.enhanced.mixed_precision.serving.sharding import Piece, shard_fp8_tensor, shard_gptq_tensor
from sglang.srt.layers.linear import (
    LinearMethodBase,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from sglang.srt.layers.moe.fused_moe_triton.layer import FusedMoEMethodBase

logger = logging.getLogger(__name__)

__all__ = ["PackedLinearMethod", "PackedMixedMoEMethod", "PackedMoEMethod"]


class _Placement:
    """Where one loaded part goes: fused part ``index``, local output offset, and the source pieces."""

    def __init__(self, index: int, offset: int, out: Piece, inp: Piece) -> None:
        self.index, self.offset, self.out, self.inp = index, offset, out, inp


class _PackedTensors:
    """The packed parameters of one module (one set, or ``w13_`` / ``w2_`` of a FusedMoE) and their loading."""

    def __init__(self, layout: ModuleLayout, prefix: str, experts: int | None, tag: str = "") -> None:
        self.layout = layout
        self.prefix = prefix  # "" for Linear, "w13_" / "w2_" for FusedMoE
        self.tag = tag  # a mixed layer's set: roles in ``tagged`` register as prefix + tag + "_" + role
        self.tagged: frozenset[str] = frozenset()
        self.experts = experts
        fmt = layout.format
        self.gptq = fmt.gptq
        self.fp8 = fmt.fp8
        self.fp8_scale = fmt.fp8_scale
        self.has_g_idx = self.gptq is not None and all(p.dtype_of("g_idx") is not None for p in layout.parts)
        self.act_order = bool(self.gptq is not None and self.gptq.desc_act and self.has_g_idx)
        scale_names = [n for p in layout.parts for n, _ in p.stored_dtypes if ".weight_scale" in n]
        self.scale_suffix = scale_names[0].rpartition(".")[2] if scale_names else "weight_scale"
        self.params: dict[str, nn.Parameter] = {}
        self.bounds: tuple[int, ...] = ()
        self.rows_split = False

    # -- creation ------------------------------------------------------------------------------
    def create(self, layer: nn.Module, n_local: int, k_local: int, k_full: int, bounds: list[int],
               params_dtype: torch.dtype | None = None) -> None:
        self.bounds = tuple(bounds)
        lead = (self.experts,) if self.experts is not None else ()
        part = self.layout.parts[0]
        if self.gptq is None and self.fp8 is None:  # the bf16 experts of a mixed layer, in the serving dtype
            self._add(layer, "weight", (*lead, n_local, k_local), params_dtype or torch.bfloat16)
            return
        if self.gptq is not None:
            values, words = block_shape(self.gptq.bits)
            for what, size in (("output", n_local), ("input", k_local)):
                if size % values:
                    raise EnhancedError(
                        f"{what} features per rank ({size}) are not a multiple of {values}, the values one "
                        f"{self.gptq.bits}-bit word block packs; choose another TP size",
                        culprit=self.layout.name,
                    )
            gs = self.gptq.group_size
            rows_split = self.rows_split = k_local != k_full
            groups = gptq_groups(k_full, gs) if (self.act_order or gs == -1 or not rows_split) \
                else math.ceil(k_local / gs)
            scales_dtype = part.dtype_of("scales") or torch.float16
            self._add(layer, "qweight", (*lead, k_local // values * words, n_local), torch.int32)
            self._add(layer, "qzeros", (*lead, groups, n_local // values * words), torch.int32)
            self._add(layer, "scales", (*lead, groups, n_local), scales_dtype)
            if self.has_g_idx:
                self._add(layer, "g_idx", (*lead, len(bounds) - 1, k_local), torch.int32)
            return
        assert self.fp8 is not None
        weight_dtype = part.dtype_of("weight") or torch.float8_e4m3fn
        self._add(layer, "weight", (*lead, n_local, k_local), weight_dtype)
        if self.fp8_scale == FP8Scale.BLOCK:
            bo, bi = self.fp8.weight_block_size  # type: ignore[misc]
            self._add(layer, self.scale_suffix, (*lead, math.ceil(n_local / bo), math.ceil(k_local / bi)),
                      torch.float32)
        else:
            self._add(layer, self.scale_suffix, (*lead, n_local), torch.float32)

    def _add(self, layer: nn.Module, role: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        param = nn.Parameter(torch.zeros(shape, dtype=dtype), requires_grad=False)
        param.enhanced_filled = 0  # type: ignore[attr-defined]
        layer.register_parameter(self.param_name(role), param)
        self.params[role] = param

    def param_name(self, role: str) -> str:
        return self.prefix + (f"{self.tag}_" if role in self.tagged else "") + role

    def roles(self) -> tuple[str, ...]:
        """The parameter roles :meth:`create` registers."""
        if self.gptq is not None:
            return ("qweight", "qzeros", "scales", *(("g_idx",) if self.has_g_idx else ()))
        return ("weight", self.scale_suffix) if self.fp8 is not None else ("weight",)

    def role_of(self, param: nn.Parameter) -> str:
        for role, p in self.params.items():
            if p is param:
                return role
        raise EnhancedError("a tensor was loaded into a parameter this module does not own", culprit=self.layout.name)

    # -- loading -------------------------------------------------------------------------------
    def place(self, param: nn.Parameter, loaded: torch.Tensor, where: _Placement, expert: int | None) -> None:
        role = self.role_of(param)
        module = self.layout.name
        dest = param.data if expert is None else param.data[expert]
        n = where.out.size
        if self.gptq is None and self.fp8 is None:
            piece = loaded[where.out.start : where.out.stop, where.inp.start : where.inp.stop]
            dest = dest[where.offset : where.offset + n]
        elif self.gptq is not None:
            piece = shard_gptq_tensor(module, role, loaded, self.gptq, out=where.out, inp=where.inp,
                                      act_order=self.act_order)
            values, words = block_shape(self.gptq.bits)
            if role in ("qweight", "scales"):
                dest = dest[:, where.offset : where.offset + n]
            elif role == "qzeros":
                if where.offset % values:
                    raise EnhancedError(
                        f"fused part starts at output feature {where.offset} of this rank, not a multiple of "
                        f"{values}", culprit=module)
                dest = dest[:, where.offset // values * words : math.ceil((where.offset + n) / values) * words]
            else:  # g_idx
                dest = dest[where.index]
        else:
            piece = shard_fp8_tensor(module, "weight" if role == "weight" else "scale", loaded,
                                     self.fp8_scale, self.fp8.weight_block_size,  # type: ignore[union-attr,arg-type]
                                     out=where.out, inp=where.inp)
            if role == "weight":
                dest = dest[where.offset : where.offset + n]
            elif self.fp8_scale == FP8Scale.BLOCK:
                bo = self.fp8.weight_block_size[0]  # type: ignore[union-attr,index]
                if where.offset % bo:
                    raise EnhancedError(
                        f"fused part starts at output feature {where.offset} of this rank, inside a scale "
                        f"block of {bo}", culprit=module)
                dest = dest[where.offset // bo : math.ceil((where.offset + n) / bo)]
            else:
                dest = dest[where.offset : where.offset + n]
        if tuple(piece.shape) != tuple(dest.shape):
            raise EnhancedError(
                f"stored {role} has shape {tuple(loaded.shape)}; this rank's piece {tuple(piece.shape)} does not "
                f"fit the packed parameter's slot {tuple(dest.shape)}",
                culprit=module,
            )
        dest.copy_(piece)
        param.enhanced_filled += dest.numel()  # type: ignore[attr-defined]

    # -- after loading -------------------------------------------------------------------------
    def finish(self, layer: nn.Module) -> GPTQExperts | FP8Experts | PlainWeights:
        """Check every parameter was filled; return the compute view of the packed weights."""
        for role, param in self.params.items():
            if param.enhanced_filled < param.numel():  # type: ignore[attr-defined]
                raise EnhancedError(
                    f"packed parameter {self.param_name(role)} was only partly loaded "
                    f"({param.enhanced_filled} of {param.numel()} values)",  # type: ignore[attr-defined]
                    culprit=self.layout.name,
                )
        if self.gptq is None and self.fp8 is None:
            return PlainWeights.loaded(self.params["weight"].data)
        if self.fp8 is not None:
            scale = self.params[self.scale_suffix]
            block = self.fp8.weight_block_size if self.fp8_scale == FP8Scale.BLOCK else None
            return FP8Experts(self.params["weight"].data, scale.data, block)
        assert self.gptq is not None
        g_idx = self.params.get("g_idx")
        if g_idx is not None and is_trivial_g_idx(g_idx.data, self.gptq.group_size):
            delattr(layer, self.param_name("g_idx"))
            del self.params["g_idx"]
            g_idx = None
        elif g_idx is not None and not self.act_order and self.rows_split:
            raise EnhancedError(
                "g_idx reorders input rows but the checkpoint says desc_act is false, so its groups were cut "
                "by tensor parallelism as if in order", culprit=self.layout.name)
        qzeros = self.params["qzeros"].data
        zero_offset = self.gptq.zero_offset
        if self.gptq.checkpoint_format == "gptq" and self.gptq.sym and stored_zeros_look_v2(qzeros, self.gptq.bits):
            logger.warning("%s: labelled checkpoint_format 'gptq' (v1, sym) but stored zeros are all %d, the "
                           "symmetric zero of 'gptq_v2'; serving as gptq_v2", self.layout.name,
                           1 << (self.gptq.bits - 1))
            zero_offset = 0
        return gptq_loaded(self.params["qweight"].data, qzeros, self.params["scales"].data,
                           g_idx.data if g_idx is not None else None, self.gptq.bits, self.gptq.group_size,
                           zero_offset, self.bounds)


def _tp_rank(layer: nn.Module) -> int:
    rank = getattr(layer, "tp_rank", None)
    if rank is not None:
        return int(rank)
    from sglang.srt.distributed import get_tensor_model_parallel_rank

    return int(get_tensor_model_parallel_rank())


def _part_features(layout: ModuleLayout, shard: str | int | None) -> int:
    for part in layout.parts:
        if part.shard == shard:
            return part.out_features
    raise EnhancedError(f"no planned weight for fused part {shard!r}", culprit=layout.name)


def _expert_placement(layer: nn.Module, layout: ModuleLayout, weight_name: str, shard_id: str
                      ) -> tuple[str, _Placement]:
    """``(slot, placement)`` of one expert projection (``w1``/``w3`` -> ``w13``, ``w2``) on this rank."""
    local = layer.intermediate_size_per_partition
    full = _part_features(layout, "w1")
    rank = _tp_rank(layer)
    if shard_id == "w2":
        return "w2", _Placement(0, 0, Piece.whole(layer.hidden_size), Piece(rank * local, local, full))
    if shard_id in ("w1", "w3"):
        index = 0 if shard_id == "w1" else 1
        return "w13", _Placement(index, index * local, Piece(rank * local, local, full),
                                 Piece.whole(layer.hidden_size))
    raise EnhancedError(f"unknown expert shard {shard_id!r}", culprit=weight_name)


class PackedLinearMethod(LinearMethodBase):
    """Weight-only GPTQ / FP8 Linear method: packed parameters, activations in the serving dtype."""

    def __init__(self, layout: ModuleLayout) -> None:
        self.layout = layout
        self.tensors = _PackedTensors(layout, "", None)
        self.weights: GPTQExperts | FP8Experts | None = None

    def create_weights(
        self,
        layer: nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs: Any,
    ) -> None:
        bounds = list(itertools.accumulate([0, *output_partition_sizes]))
        self.tensors.create(layer, bounds[-1], input_size_per_partition, input_size, bounds)
        for param in self.tensors.params.values():
            param.weight_loader = self._loader(layer)  # type: ignore[attr-defined]

    def _loader(self, layer: nn.Module):  # noqa: ANN202
        def weight_loader(param: nn.Parameter, loaded_weight: torch.Tensor, loaded_shard_id: Any = None) -> None:
            self.tensors.place(param, loaded_weight, self._placement(layer, loaded_shard_id), None)

        return weight_loader

    def _placement(self, layer: nn.Module, shard: Any) -> _Placement:
        layout = self.layout
        if isinstance(layer, QKVParallelLinear):
            index = "qkv".index(shard)
            q, kv = layer.num_heads * layer.head_size, layer.num_kv_heads * layer.head_size
            size = q if shard == "q" else kv
            rank = _tp_rank(layer) if shard == "q" else _tp_rank(layer) // layer.num_kv_head_replicas
            out = Piece(rank * size, size, _part_features(layout, shard))
            return _Placement(index, (0, q, q + kv)[index], out, Piece.whole(layer.input_size))
        if isinstance(layer, MergedColumnParallelLinear):
            tp = layer.tp_size
            size = layer.output_sizes[shard] // tp
            out = Piece(_tp_rank(layer) * size, size, layer.output_sizes[shard])
            return _Placement(shard, sum(layer.output_sizes[:shard]) // tp, out, Piece.whole(layer.input_size))
        if isinstance(layer, RowParallelLinear):
            k = layer.input_size_per_partition
            return _Placement(0, 0, Piece.whole(layer.output_size), Piece(_tp_rank(layer) * k, k, layer.input_size))
        size = getattr(layer, "output_size_per_partition", layer.output_size)
        start = _tp_rank(layer) * size if size != layer.output_size else 0
        return _Placement(0, 0, Piece(start, size, layer.output_size), Piece.whole(layer.input_size))

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        self.weights = self.tensors.finish(layer)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        assert self.weights is not None, "packed weights used before loading finished"
        return packed_linear(x, self.weights, bias)


class PackedMoEMethod(FusedMoEMethodBase):
    """Weight-only GPTQ / FP8 FusedMoE method: experts stay packed; routing is SGLang's ``select_experts``."""

    def __init__(self, layout: ModuleLayout) -> None:
        self.layout = layout
        self.w13 = _PackedTensors(layout, "w13_", None)
        self.w2 = _PackedTensors(layout, "w2_", None)
        self.weights: tuple[GPTQExperts | FP8Experts, GPTQExperts | FP8Experts] | None = None

    def create_weights(
        self,
        layer: nn.Module,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs: Any,
    ) -> None:
        full = _part_features(self.layout, "w1")  # the down projection's unsharded input features
        loader = self._loader(layer)
        for slot, tensors in self._slot_tensors(num_experts):
            if slot == "w13":
                tensors.create(layer, 2 * intermediate_size, hidden_size, hidden_size,
                               [0, intermediate_size, 2 * intermediate_size], params_dtype)  # fmt: skip
            else:
                tensors.create(layer, hidden_size, intermediate_size, full, [0, hidden_size], params_dtype)
            for param in tensors.params.values():
                param.weight_loader = loader  # type: ignore[attr-defined]

    def _slot_tensors(self, num_experts: int) -> list[tuple[str, _PackedTensors]]:
        """The packed tensor sets to create, each with its slot (``w13`` gate+up, ``w2`` down)."""
        self.w13.experts = self.w2.experts = num_experts
        return [("w13", self.w13), ("w2", self.w2)]

    def _loader(self, layer: nn.Module):  # noqa: ANN202
        def weight_loader(
            param: nn.Parameter, loaded_weight: torch.Tensor, weight_name: str, shard_id: str, expert_id: int
        ) -> None:
            slot, where = _expert_placement(layer, self.layout, weight_name, shard_id)
            (self.w2 if slot == "w2" else self.w13).place(param, loaded_weight, where, expert_id)

        return weight_loader

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        self.weights = (self.w13.finish(layer), self.w2.finish(layer))

    def apply(
        self,
        layer: nn.Module,
        x: torch.Tensor,
        router_logits: torch.Tensor,
        top_k: int,
        renormalize: bool,
        use_grouped_topk: bool,
        topk_group: int | None = None,
        num_expert_group: int | None = None,
        num_fused_shared_experts: int = 0,
        custom_routing_function: Any = None,
        correction_bias: torch.Tensor | None = None,
        activation: str = "silu",
        apply_router_weight_on_input: bool = False,
        inplace: bool = True,
        no_combine: bool = False,
        routed_scaling_factor: float | None = None,
    ) -> torch.Tensor:
        from sglang.srt.layers.moe import topk as sglang_topk
        from sglang.srt.utils import is_cuda

        if apply_router_weight_on_input or no_combine:
            raise EnhancedError("packed MoE does not apply router weights on the input or skip the combine",
                                culprit=self.layout.name)
        assert self.weights is not None, "packed experts used before loading finished"
        topk_weights, topk_ids = sglang_topk.select_experts(
            hidden_states=x, router_logits=router_logits, top_k=top_k, use_grouped_topk=use_grouped_topk,
            renormalize=renormalize, topk_group=topk_group, num_expert_group=num_expert_group,
            num_fused_shared_experts=num_fused_shared_experts, custom_routing_function=custom_routing_function,
            correction_bias=correction_bias, torch_native=not x.is_cuda, routed_scaling_factor=routed_scaling_factor,
        )
        out = moe_forward(x, *self.weights, topk_weights, topk_ids, activation)
        # Where SGLang's own fused kernel scales the routed output (CUDA builds), do the same;
        # elsewhere the model scales it itself.
        if routed_scaling_factor is not None and is_cuda():
            out = out * routed_scaling_factor
        return out


class PackedMixedMoEMethod(PackedMoEMethod):
    """FusedMoE whose experts come in several formats: one packed set per format and slot, one launch per set."""

    def __init__(self, layout: ModuleLayout) -> None:
        self.layout = layout
        self.sets = [
            (s, _PackedTensors(s.layout, f"{s.slot}_", len(s.experts), tag=s.format_name.replace("-", "_")))
            for s in layout.expert_sets
        ]
        self.owner: dict[tuple[str, int], tuple[_PackedTensors, int]] = {
            (s.slot, e): (tensors, i) for s, tensors in self.sets for i, e in enumerate(s.experts)
        }
        self.weights: tuple[MixedExperts, MixedExperts] | None = None  # type: ignore[assignment]

    def _slot_tensors(self, num_experts: int) -> list[tuple[str, _PackedTensors]]:
        """Every expert set, after checking that each slot's sets hold experts ``0..num_experts-1``;
        a later set's tensor whose name an earlier set of its slot took gets its format in the name."""
        for slot in ("w13", "w2"):
            held = sorted(e for s, e in self.owner if s == slot)
            if held != list(range(num_experts)):
                raise EnhancedError(f"the {slot} expert sets hold experts {held}, not 0..{num_experts - 1}",
                                    culprit=self.layout.name)
        taken: set[str] = set()
        for s, tensors in self.sets:
            tensors.tagged = frozenset(r for r in tensors.roles() if f"{s.slot}_{r}" in taken)
            taken.update(f"{s.slot}_{r}" for r in tensors.roles())
        return [(s.slot, tensors) for s, tensors in self.sets]

    def _loader(self, layer: nn.Module):  # noqa: ANN202
        def weight_loader(
            param: nn.Parameter, loaded_weight: torch.Tensor, weight_name: str, shard_id: str, expert_id: int
        ) -> None:
            slot, where = _expert_placement(layer, self.layout, weight_name, shard_id)
            owner = self.owner.get((slot, int(expert_id)))
            if owner is None:
                raise EnhancedError(f"expert {expert_id} is in none of the {slot} expert sets", culprit=weight_name)
            tensors, local = owner
            role = weight_name.rpartition(".")[2].removeprefix(f"{slot}_")
            target = tensors.params.get(role)
            if target is None:
                raise EnhancedError(
                    f"expert {expert_id}'s {slot} is served as {tensors.layout.format.name}, which has no {role} "
                    f"tensor", culprit=weight_name)
            tensors.place(target, loaded_weight, where, local)

        return weight_loader

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        slots = []
        for slot in ("w13", "w2"):
            members = [(s, tensors) for s, tensors in self.sets if s.slot == slot]
            finished = tuple(tensors.finish(layer) for _, tensors in members)
            device = next(iter(members[0][1].params.values())).device
            slots.append(MixedExperts.build(finished, tuple(s.experts for s, _ in members), layer.num_experts, device))
        self.weights = (slots[0], slots[1])

    def entries_of(self, param_name: str) -> tuple[PlanEntry, ...]:
        """The planned weights whose stored tensors the parameter ``param_name`` holds."""
        for s, tensors in self.sets:
            if any(tensors.param_name(r) == param_name for r in tensors.params):
                return tuple(p.entry for p in s.layout.parts)
        return ()
