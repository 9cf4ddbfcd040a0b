"""GPTQ checkpoints (AutoGPTQ / GPTQModel layout): ``qweight``/``qzeros``/``scales``/``g_idx``.

Stored per linear layer ``X``:

- ``X.qweight`` int32 ``[in*bits/32, out]``, packed along dim 0;
- ``X.qzeros``  int32 ``[groups, out*bits/32]``, packed along dim 1;
- ``X.scales``  float ``[groups, out]``;
- ``X.g_idx``   int32 ``[in]`` (optional): group of every input row (act-order).

``checkpoint_format`` ``"gptq"`` (v1) stores ``zero - 1``; ``"gptq_v2"`` stores the zero.
The decoded weight is ``scales[g, o] * (q[i, o] - zero[g, o])`` in ``[out, in]`` layout.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sglang.srt.enhanced.errors import EnhancedError
from sglang.srt.enhanced.mixed_precision.decoders.plain import (
    cast_stored,
    stored_nbytes,
    stored_part,
)
from sglang.srt.enhanced.mixed_precision.decoders.registry import read_json, register_decoder
from sglang.srt.enhanced.mixed_precision.kernels.reference import gptq_dequant_ref
from sglang.srt.enhanced.mixed_precision.packing import SUPPORTED_BITS, block_shape, pack_int32

logger = logging.getLogger(__name__)

CHECKPOINT_FORMATS = ("gptq", "gptq_v2")
PART_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")
_MISSING = torch.empty(0, device="meta")  # stands for an absent part: fails the dimension checks


@dataclass(frozen=True)
class GPTQSettings:
    """The quantization parameters of one GPTQ checkpoint."""

    bits: int = 4
    group_size: int = 128
    sym: bool = True
    desc_act: bool = False
    checkpoint_format: str = "gptq"

    def __post_init__(self) -> None:
        self.validate("GPTQSettings")

    @property
    def zero_offset(self) -> int:
        """Added to stored zeros to get real zeros: 1 for v1 ``gptq``, 0 for ``gptq_v2``."""
        return 1 if self.checkpoint_format == "gptq" else 0

    def validate(self, source: str) -> None:
        if isinstance(self.bits, bool) or self.bits not in SUPPORTED_BITS:
            raise EnhancedError(
                f"bits must be one of {list(SUPPORTED_BITS)}, got {self.bits!r}", culprit=f"{source}:bits"
            )
        if (
            isinstance(self.group_size, bool)
            or not isinstance(self.group_size, int)
            or not (self.group_size == -1 or self.group_size > 0)
        ):
            raise EnhancedError(
                f"group_size must be a positive integer or -1, got {self.group_size!r}",
                culprit=f"{source}:group_size",
            )
        for key in ("sym", "desc_act"):
            if not isinstance(getattr(self, key), bool):
                raise EnhancedError(
                    f"{key} must be true or false, got {getattr(self, key)!r}", culprit=f"{source}:{key}"
                )
        if self.checkpoint_format not in CHECKPOINT_FORMATS:
            raise EnhancedError(
                f"checkpoint_format must be one of {list(CHECKPOINT_FORMATS)}, got {self.checkpoint_format!r}",
                culprit=f"{source}:checkpoint_format",
            )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str) -> GPTQSettings:
        """Build from a ``quantize_config.json``-style mapping; ``source`` names it in errors."""
        for key in ("bits", "group_size"):
            if key not in data:
                raise EnhancedError(f"required key {key!r} missing", culprit=f"{source}:{key}")
        fmt = data.get("checkpoint_format", "gptq")
        fmt = fmt.lower() if isinstance(fmt, str) else fmt
        # Constructed without __post_init__ first so the error names the real source.
        obj = object.__new__(cls)
        for key, value in (
            ("bits", data["bits"]),
            ("group_size", data["group_size"]),
            ("sym", data.get("sym", True)),
            ("desc_act", data.get("desc_act", False)),
            ("checkpoint_format", fmt),
        ):
            object.__setattr__(obj, key, value)
        obj.validate(source)
        return obj

    @classmethod
    def from_checkpoint_dir(cls, folder: Path) -> GPTQSettings:
        """Read ``config.json``'s ``quantization_config``, else ``quantize_config.json``."""
        folder = Path(folder)
        config_path = folder / "config.json"
        if config_path.is_file():
            qc = read_json(config_path).get("quantization_config")
            if isinstance(qc, dict) and str(qc.get("quant_method", "")).lower() == "gptq":
                return cls.from_dict(qc, f"{config_path}:quantization_config")
        qpath = folder / "quantize_config.json"
        if qpath.is_file():
            return cls.from_dict(read_json(qpath), str(qpath))
        raise EnhancedError(
            "no GPTQ quantization config: neither config.json quantization_config with quant_method "
            "'gptq' nor quantize_config.json",
            culprit=str(folder),
        )


def _shapes(parts: Mapping[str, torch.Tensor | tuple[int, ...]]) -> str:
    return ", ".join(
        f"{k}: {tuple(v.shape) if isinstance(v, torch.Tensor) else tuple(v)}"
        + (f" {v.dtype}" if isinstance(v, torch.Tensor) else "")
        for k, v in parts.items()
    )


@dataclass(frozen=True)
class GPTQShapes:
    """Dimensions of one GPTQ layer, checked against each other."""

    in_features: int
    out_features: int
    groups: int
    group_size: int  # -1 when one group spans all rows


def check_gptq_shapes(
    name: str,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor | None,
    bits: int,
    group_size: int | None,
    strict: bool = True,
) -> GPTQShapes:
    """Validate the parts of one GPTQ layer.

    With ``strict=False`` a ``group_size`` that disagrees with the number of scale rows is
    replaced by the one the shapes imply (``ceil(in_features / groups)``), logged at DEBUG.

    A leading batch dim (stacked experts) is allowed when all parts have it.
    Raises ``EnhancedError`` naming ``name`` and listing all shapes.
    """
    parts = {"qweight": qweight, "qzeros": qzeros, "scales": scales}
    if g_idx is not None:
        parts["g_idx"] = g_idx

    def fail(why: str) -> EnhancedError:
        return EnhancedError(f"bad GPTQ tensors ({why}); shapes: {_shapes(parts)}", culprit=name)

    if bits not in SUPPORTED_BITS:
        raise fail(f"unsupported bits {bits}")
    nd = qweight.dim()
    if (
        nd not in (2, 3)
        or qzeros.dim() != nd
        or scales.dim() != nd
        or (g_idx is not None and g_idx.dim() != nd - 1)
    ):
        raise fail("qweight, qzeros and scales must be 2-D (3-D when stacked), g_idx one dim less")
    if (
        nd == 3
        and not (qweight.shape[0] == qzeros.shape[0] == scales.shape[0])
        or (nd == 3 and g_idx is not None and g_idx.shape[0] != qweight.shape[0])
    ):
        raise fail("stacked parts disagree on the batch size")
    if qweight.dtype != torch.int32 or qzeros.dtype != torch.int32:
        raise fail("qweight and qzeros must be int32")
    if not scales.dtype.is_floating_point:
        raise fail("scales must be a float tensor")
    if g_idx is not None and (g_idx.dtype.is_floating_point or g_idx.dtype == torch.bool):
        raise fail("g_idx must be an integer tensor")
    values, words = block_shape(bits)
    rows, out_features = qweight.shape[-2:]
    if rows % words:
        raise fail(f"qweight rows {rows} not a multiple of {words} for {bits}-bit packing")
    in_features = rows // words * values
    groups = scales.shape[-2]
    if scales.shape[-1] != out_features:
        raise fail(f"scales has {scales.shape[-1]} columns, qweight has {out_features}")
    if qzeros.shape[-2] != groups:
        raise fail(f"qzeros has {qzeros.shape[-2]} groups, scales has {groups}")
    if qzeros.shape[-1] * 32 != out_features * bits:
        raise fail(
            f"qzeros has {qzeros.shape[-1]} columns, expected out*bits/32 = {out_features * bits / 32:g}"
        )
    if groups < 1:
        raise fail("no groups")

    def groups_for(gs: int) -> int:
        return 1 if gs == -1 or gs >= in_features else math.ceil(in_features / gs)

    if g_idx is not None:
        if g_idx.shape[-1] != in_features:
            raise fail(f"g_idx has {g_idx.shape[-1]} entries, in_features is {in_features}")
        if g_idx.numel() and (int(g_idx.min()) < 0 or int(g_idx.max()) >= groups):
            raise fail(
                f"g_idx values must lie in [0, {groups}), got [{int(g_idx.min())}, {int(g_idx.max())}]"
            )
        effective = group_size if group_size is not None and group_size != 0 else -1
    elif (
        group_size is not None
        and group_size != 0
        and (group_size == -1 or group_size > 0)
        and (groups_for(group_size) == groups)
    ):
        effective = group_size
    elif strict:
        raise fail(
            f"group_size {group_size} gives {groups_for(group_size) if group_size else '?'} groups "
            f"for {in_features} input rows, scales have {groups}"
        )
    else:
        effective = -1 if groups == 1 else math.ceil(in_features / groups)
        if groups_for(effective) != groups:
            raise fail(f"{groups} groups cannot split {in_features} input rows evenly")
        logger.debug(
            "group_size %s does not match the tensors; derived %d input rows / %d groups -> %d",
            group_size,
            in_features,
            groups,
            effective,
        )
    logger.debug(
        "%s: qweight %s -> in_features = %d rows * 32 / %d bits = %d, out_features = %d; "
        "%d groups -> group_size %d",
        name,
        tuple(qweight.shape),
        rows,
        bits,
        in_features,
        out_features,
        groups,
        effective,
    )
    return GPTQShapes(in_features, out_features, groups, effective)


def is_trivial_g_idx(g_idx: torch.Tensor, group_size: int) -> bool:
    """True when ``g_idx[i] == i // group_size`` for every row (no act-order reordering)."""
    n = g_idx.shape[-1]
    expected = torch.arange(n, device=g_idx.device) // (group_size if group_size > 0 else max(n, 1))
    return bool((g_idx.to(torch.long) == expected).all())


def stored_zeros_look_v2(qzeros: torch.Tensor, bits: int) -> bool:
    """True when every stored zero equals ``2**(bits-1)`` (the symmetric zero of ``gptq_v2``)."""
    cols = qzeros.shape[-1]
    words = block_shape(bits)[1]
    if cols % words:
        return False
    per_block = torch.full((1, block_shape(bits)[0]), 1 << (bits - 1), dtype=torch.int32)
    pattern = pack_int32(per_block, bits, dim=1).to(qzeros.device)  # one block of words
    return bool((qzeros.reshape(-1, words) == pattern).all())


def _dequant(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor | None,
    *,
    bits: int,
    group_size: int,
    zero_offset: int,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """Triton on CUDA tensors, the vectorised torch reference elsewhere; 2-D or stacked 3-D."""
    if qweight.is_cuda:
        from sglang.srt.enhanced.mixed_precision.kernels.gptq_dequant import (
            gptq_dequant,
            gptq_dequant_batched,
        )

        fn = gptq_dequant_batched if qweight.dim() == 3 else gptq_dequant
        return fn(
            qweight,
            qzeros,
            scales,
            g_idx,
            bits=bits,
            group_size=group_size,
            zero_offset=zero_offset,
            out_dtype=out_dtype,
        )
    return gptq_dequant_ref(
        qweight,
        qzeros,
        scales,
        g_idx,
        bits=bits,
        group_size=group_size,
        zero_offset=zero_offset,
        out_dtype=out_dtype,
    )


@register_decoder("gptq")
class GPTQDecoder:
    """Maps ``X.qweight/X.qzeros/X.scales/X.g_idx`` to ``X.weight``; other tensors pass through."""

    format_name = "gptq"

    def __init__(self, settings: GPTQSettings, source: str = "<gptq checkpoint>") -> None:
        self.settings = settings
        self.source = source
        self._mislabel_warned = False

    @classmethod
    def from_checkpoint(cls, folder: Path, quantization_config: Mapping[str, Any] | None) -> GPTQDecoder:
        return cls(GPTQSettings.from_checkpoint_dir(folder), source=str(folder))

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
        return _dequant(
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
                results[idxs[0]] = _dequant(
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
            out = _dequant(
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
        meta = {
            suffix: torch.empty(tuple(shape), dtype=torch.float16 if suffix == "scales" else torch.int32,
                                device="meta")
            for suffix in ("qweight", "qzeros", "scales")
            if (shape := part_shapes.get(f"{prefix}.{suffix}")) is not None
        }
        g_idx_shape = part_shapes.get(f"{prefix}.g_idx")
        shapes = check_gptq_shapes(
            logical_name, meta["qweight"], meta.get("qzeros", _MISSING), meta.get("scales", _MISSING), None,
            self.settings.bits, self.settings.group_size, strict=g_idx_shape is None,
        )
        if g_idx_shape is not None and tuple(g_idx_shape) != (*tuple(qshape)[:-2], shapes.in_features):
            raise EnhancedError(
                f"bad GPTQ tensors (g_idx has shape {tuple(g_idx_shape)}, in_features is {shapes.in_features})",
                culprit=logical_name,
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
        return _dequant(
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
