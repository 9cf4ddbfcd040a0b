"""GPTQ checkpoints (AutoGPTQ / GPTQModel layout): ``qweight``/``qzeros``/``scales``/``g_idx`` decoded to floats.

The format and its shape check live in :mod:`...formats.gptq`; this module turns a
checked tensor set into the float weight ``[out, in]``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from sglang.srt.enhanced.errors import EnhancedError
from sglang.srt.enhanced.mixed_precision.decoders.plain import (
    cast_stored,
    stored_nbytes,
    stored_part,
)
from sglang.srt.enhanced.mixed_precision.decoders.registry import register_decoder
from sglang.srt.enhanced.mixed_precision.dequant import dequant_gptq
from sglang.srt.enhanced.mixed_precision.formats.gptq import (
    CHECKPOINT_FORMATS,
    PART_SUFFIXES,
    GPTQFormat,
    check_gptq_shapes,
    is_trivial_g_idx,
    meta_parts,
    stored_zeros_look_v2,
)

logger = logging.getLogger(__name__)

# The format description under the name the decoder API has always used.
GPTQSettings = GPTQFormat


def _shapes(parts: Mapping[str, torch.Tensor]) -> str:
    return ", ".join(f"{k}: {tuple(v.shape)} {v.dtype}" for k, v in parts.items())


@register_decoder("gptq")
class GPTQDecoder:
    """Maps ``X.qweight/X.qzeros/X.scales/X.g_idx`` to ``X.weight``; other tensors pass through."""

    format_name = "gptq"

    def __init__(self, settings: GPTQFormat, source: str = "<gptq checkpoint>") -> None:
        self.settings = settings
        self.source = source
        self._mislabel_warned = False

    @classmethod
    def from_checkpoint(cls, folder: Path, quantization_config: Mapping[str, Any] | None) -> GPTQDecoder:
        return cls(GPTQFormat.from_checkpoint_dir(folder), source=str(folder))

    # -- names ---------------------------------------------------------------------------
    def logical_names(self, stored_names: Iterable[str]) -> dict[str, tuple[str, ...]]:
        stored = set(stored_names)
        prefixes = {n[: -len(".qweight")] for n in stored if n.endswith(".qweight")}
        mapping: dict[str, tuple[str, ...]] = {}
        consumed: set[str] = set()
        for prefix in sorted(prefixes):
            is_gptq_weight(stored, prefix)  # raises when qzeros or scales are missing
            needed = [f"{prefix}.qweight", f"{prefix}.qzeros", f"{prefix}.scales"]
            if f"{prefix}.weight" in stored:
                raise EnhancedError(
                    "both a float weight and GPTQ tensors are stored", culprit=f"{prefix}.weight"
                )
            if f"{prefix}.g_idx" in stored:
                needed.append(f"{prefix}.g_idx")
            mapping[f"{prefix}.weight"] = tuple(needed)
            consumed.update(needed)
        for name in sorted(stored - consumed):
            mapping[name] = (name,)
        return mapping

    @staticmethod
    def _prefix(logical_name: str) -> str:
        return logical_name.removesuffix(".weight")

    def _is_quantized(self, logical_name: str, keys: Iterable[str]) -> bool:
        return f"{self._prefix(logical_name)}.qweight" in set(keys)

    # -- decoding ------------------------------------------------------------------------
    def _zero_offset(self, qzeros: torch.Tensor, name: str) -> int:
        s = self.settings
        if s.checkpoint_format == "gptq" and s.sym and stored_zeros_look_v2(qzeros, s.bits):
            if not self._mislabel_warned:
                self._mislabel_warned = True
                logger.warning(
                    "%s: labelled checkpoint_format 'gptq' (v1, sym) but stored zeros are all %d, the "
                    "symmetric zero of 'gptq_v2'; decoding as gptq_v2 (first seen at %s)",
                    self.source,
                    1 << (s.bits - 1),
                    name,
                )
            return 0
        return s.zero_offset

    def _parts(self, logical_name: str, parts: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        prefix = self._prefix(logical_name)
        got = []
        for suffix in PART_SUFFIXES:
            t = parts.get(f"{prefix}.{suffix}")
            if t is None and suffix != "g_idx":
                raise EnhancedError(
                    f"GPTQ part {suffix} missing; parts given: {_shapes(parts)}", culprit=logical_name
                )
            got.append(t)
        return tuple(got)

    def _prepare(self, logical_name: str, parts: Mapping[str, torch.Tensor]):
        qweight, qzeros, scales, g_idx = self._parts(logical_name, parts)
        s = self.settings
        shapes = check_gptq_shapes(logical_name, qweight, qzeros, scales, g_idx, s.bits, s.group_size)
        if g_idx is not None and is_trivial_g_idx(g_idx, s.group_size):
            g_idx = None
        return qweight, qzeros, scales, g_idx, shapes

    def decode(
        self, logical_name: str, parts: Mapping[str, torch.Tensor], dtype: torch.dtype
    ) -> torch.Tensor:
        if not self._is_quantized(logical_name, parts):
            return cast_stored(logical_name, stored_part(logical_name, parts), dtype)
        qweight, qzeros, scales, g_idx, shapes = self._prepare(logical_name, parts)
        return dequant_gptq(
            qweight,
            qzeros,
            scales,
            g_idx,
            bits=self.settings.bits,
            group_size=shapes.group_size,
            zero_offset=self._zero_offset(qzeros, logical_name),
            out_dtype=dtype,
        )

    def decode_many(
        self,
        logical_names: Sequence[str],
        parts_list: Sequence[Mapping[str, torch.Tensor]],
        dtype: torch.dtype,
    ) -> list[torch.Tensor]:
        """Decode several weights; same-shape GPTQ layers on one device go through one batched launch."""
        if len(logical_names) != len(parts_list):
            raise EnhancedError(
                f"{len(logical_names)} names but {len(parts_list)} part sets", culprit="decode_many"
            )
        results: list[torch.Tensor | None] = [None] * len(logical_names)
        buckets: dict[tuple, list[int]] = {}
        prepared: dict[int, tuple] = {}
        for i, (name, parts) in enumerate(zip(logical_names, parts_list, strict=True)):
            if not self._is_quantized(name, parts):
                results[i] = self.decode(name, parts, dtype)
                continue
            qweight, qzeros, scales, g_idx, shapes = self._prepare(name, parts)
            zero_offset = self._zero_offset(qzeros, name)
            prepared[i] = (qweight, qzeros, scales, g_idx, shapes, zero_offset)
            key = (
                tuple(qweight.shape),
                tuple(qzeros.shape),
                tuple(scales.shape),
                scales.dtype,
                g_idx is not None,
                qweight.device,
                shapes.group_size,
                zero_offset,
            )
            buckets.setdefault(key, []).append(i)
        for key, idxs in buckets.items():
            if len(idxs) == 1:
                qweight, qzeros, scales, g_idx, shapes, zero_offset = prepared[idxs[0]]
                results[idxs[0]] = dequant_gptq(
                    qweight,
                    qzeros,
                    scales,
                    g_idx,
                    bits=self.settings.bits,
                    group_size=shapes.group_size,
                    zero_offset=zero_offset,
                    out_dtype=dtype,
                )
                continue
            stack = [torch.stack([prepared[i][k] for i in idxs]) for k in range(3)]
            g = torch.stack([prepared[i][3] for i in idxs]) if key[4] else None
            shapes, zero_offset = prepared[idxs[0]][4], prepared[idxs[0]][5]
            out = dequant_gptq(
                *stack,
                g,
                bits=self.settings.bits,
                group_size=shapes.group_size,
                zero_offset=zero_offset,
                out_dtype=dtype,
            )
            for j, i in enumerate(idxs):
                results[i] = out[j]
        return results  # type: ignore[return-value]

    def decoded_nbytes(
        self, logical_name: str, part_shapes: Mapping[str, tuple[int, ...]], dtype: torch.dtype
    ) -> int:
        prefix = self._prefix(logical_name)
        qshape = part_shapes.get(f"{prefix}.qweight")
        if qshape is None:
            return stored_nbytes(logical_name, part_shapes, dtype)
        # Check the parts against each other now, from their shapes alone, so a broken
        # checkpoint is refused when the plan is built rather than half-way through a load.
        meta = meta_parts(prefix, part_shapes)
        shapes = check_gptq_shapes(
            logical_name, meta["qweight"], meta["qzeros"], meta["scales"], meta["g_idx"],
            self.settings.bits, self.settings.group_size, strict=meta["g_idx"] is None,
        )
        return shapes.in_features * shapes.out_features * dtype.itemsize


class GPTQDequantizer:
    """Stateless GPTQ dequantization with the interface of the original product."""

    @staticmethod
    def dequantize_gptq_weight(
        qweight: torch.Tensor,
        qzeros: torch.Tensor,
        scales: torch.Tensor,
        g_idx: torch.Tensor | None = None,
        bits: int = 4,
        group_size: int = 128,
        *,
        sym: bool = True,
        checkpoint_format: str = "gptq",
        zero_offset: int | None = None,
        out_dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """Float weight ``[out, in]`` from GPTQ tensors.

        Dimensions come from the shapes: ``in = qweight.shape[0] * 32 / bits``,
        ``out = qweight.shape[1]``, and the real group size is ``in / scales.shape[0]``
        when ``group_size`` disagrees with the tensors (logged at DEBUG).
        ``zero_offset`` overrides ``checkpoint_format`` (1 for v1 ``gptq``, 0 for ``gptq_v2``).
        ``sym`` is accepted for interface compatibility: the stored zeros already encode it.
        """
        if checkpoint_format not in CHECKPOINT_FORMATS:
            raise EnhancedError(
                f"checkpoint_format must be one of {list(CHECKPOINT_FORMATS)}, got {checkpoint_format!r}",
                culprit="checkpoint_format",
            )
        if zero_offset is None:
            zero_offset = 1 if checkpoint_format == "gptq" else 0
        shapes = check_gptq_shapes("<tensor>", qweight, qzeros, scales, g_idx, bits, group_size, strict=False)
        return dequant_gptq(
            qweight,
            qzeros,
            scales,
            g_idx,
            bits=bits,
            group_size=shapes.group_size,
            zero_offset=zero_offset,
            out_dtype=out_dtype or scales.dtype,
        )


def is_gptq_weight(weights: Mapping[str, Any] | Iterable[str], weight_name: str) -> bool:
    """Whether ``weight_name`` (``X.weight`` or ``X``) is stored GPTQ-packed among ``weights``.

    ``weights`` is a state dict, an open safetensors file (anything with ``keys()``) or the
    tensor names; only the names are read. True when ``X.qweight``, ``X.qzeros`` and
    ``X.scales`` are all there; a ``qweight`` without the others raises ``EnhancedError``.
    """
    names = set(weights.keys() if hasattr(weights, "keys") else weights)
    prefix = weight_name.removesuffix(".weight")
    if f"{prefix}.qweight" not in names:
        return False
    missing = [f"{prefix}.{part}" for part in ("qzeros", "scales") if f"{prefix}.{part}" not in names]
    if missing:
        raise EnhancedError(f"GPTQ layer lacks {missing}", culprit=f"{prefix}.weight")
    return True
