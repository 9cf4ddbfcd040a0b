"""GPTQ tensor sets: the one description of their format and the one check of their shapes.

Stored per linear layer ``X`` (AutoGPTQ / GPTQModel layout):

- ``X.qweight`` int32 ``[in*bits/32, out]``, packed along dim 0;
- ``X.qzeros``  int32 ``[groups, out*bits/32]``, packed along dim 1;
- ``X.scales``  float ``[groups, out]``;
- ``X.g_idx``   int32 ``[in]`` (optional): group of every input row (act-order).

``checkpoint_format`` ``"gptq"`` (v1) stores ``zero - 1``; ``"gptq_v2"`` stores the zero.
The weight is ``scales[g, o] * (q[i, o] - zero[g, o])`` in ``[out, in]`` layout.

:func:`check_gptq_shapes` works on real or ``meta`` tensors, so the plan checks a
checkpoint from its header alone with the same code the decoder and the packed
serving methods run on the data.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sglang.srt.enhanced.errors import EnhancedError
from sglang.srt.enhanced.mixed_precision.decoders.registry import read_json
from sglang.srt.enhanced.mixed_precision.packing import SUPPORTED_BITS, block_shape, pack_int32

logger = logging.getLogger(__name__)

__all__ = ["CHECKPOINT_FORMATS", "PART_SUFFIXES", "GPTQFormat", "GPTQShapes", "check_gptq_shapes", "is_trivial_g_idx", "meta_parts",
           "stored_zeros_look_v2"]

CHECKPOINT_FORMATS = ("gptq", "gptq_v2")
PART_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")
_MISSING = torch.empty(0, device="meta")  # stands for an absent part: fails the dimension checks


def meta_parts(prefix: str, part_shapes: Mapping[str, tuple[int, ...]]) -> dict[str, torch.Tensor | None]:
    """``meta`` tensors standing for the stored parts ``prefix.<suffix>`` (absent ones fail the check)."""
    out: dict[str, torch.Tensor | None] = {}
    for suffix in PART_SUFFIXES:
        shape = part_shapes.get(f"{prefix}.{suffix}")
        if shape is None:
            out[suffix] = None if suffix == "g_idx" else _MISSING
        else:
            dtype = torch.float16 if suffix == "scales" else torch.int32
            out[suffix] = torch.empty(tuple(shape), dtype=dtype, device="meta")
    return out


@dataclass(frozen=True)
class GPTQFormat:
    """The quantization parameters of one GPTQ tensor set (a checkpoint's ``quantize_config``)."""

    bits: int = 4
    group_size: int = 128
    sym: bool = True
    desc_act: bool = False
    checkpoint_format: str = "gptq"

    def __post_init__(self) -> None:
        self.validate("GPTQFormat")

    @property
    def zero_offset(self) -> int:
        """Added to stored zeros to get real zeros: 1 for v1 ``gptq``, 0 for ``gptq_v2``."""
        return 1 if self.checkpoint_format == "gptq" else 0

    @property
    def name(self) -> str:
        """Short name of the packed format, e.g. ``gptq-4bit-g128`` (``-gall`` for one group, ``-act`` for act-order)."""
        group = "all" if self.group_size == -1 else str(self.group_size)
        return f"gptq-{self.bits}bit-g{group}" + ("-act" if self.desc_act else "")

    def quantize_config(self) -> dict[str, Any]:
        """The ``quantize_config.json`` content GPTQ tools write for this format."""
        return {
            "bits": self.bits,
            "group_size": self.group_size,
            "desc_act": self.desc_act,
            "sym": self.sym,
            "lm_head": False,
            "checkpoint_format": self.checkpoint_format,
            "quant_method": "gptq",
        }

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
    def from_dict(cls, data: Mapping[str, Any], source: str) -> GPTQFormat:
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
    def from_checkpoint_dir(cls, folder: Path) -> GPTQFormat:
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
        if g_idx.numel() and not g_idx.is_meta and (int(g_idx.min()) < 0 or int(g_idx.max()) >= groups):
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
