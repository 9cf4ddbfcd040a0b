"""Which SGLang module each planned weight ends up in, and how that module is served.

A pure function of the plan and the checkpoint headers (no SGLang import), so ``--plan``
shows the same decisions the server makes:

* the routed experts ``X.experts.<e>.<proj>.weight`` of one layer form the FusedMoE module
  ``X.experts`` (gate and up projections are its ``w13``, down its ``w2``);
* the parts SGLang fuses (``q/k/v_proj`` -> ``qkv_proj``, ``gate/up_proj`` -> ``gate_up_proj``)
  form one module; every other ``X.weight`` is the module ``X``.

A module is served **packed** when all its parts are quantized the same way (one GPTQ
format, or FP8 with one scale layout), **unquantized** when none is quantized, and
**decoded** (to the serving dtype) otherwise, with the reason recorded. A FusedMoE whose
experts come in several formats is served packed too, as **packed-mixed**: one
:class:`ExpertSet` per format and slot (gate+up ``w13``, down ``w2``), each stacked over its
experts only; it is decoded only when one expert's gate and up differ (they share one fused
weight) or a set's fused parts do not join on whole packed words.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch

from sglang.srt.enhanced.config import Precision
from sglang.srt.enhanced.mixed_precision.formats.fp8 import FP8Format, FP8Scale, check_fp8_tensors
from sglang.srt.enhanced.mixed_precision.formats.gptq import GPTQFormat
from sglang.srt.enhanced.mixed_precision.packing import block_shape
from sglang.srt.enhanced.mixed_precision.plan import LoadPlan, PlanEntry, format_bytes
from sglang.srt.enhanced.mixed_precision.sources import CheckpointSource

__all__ = [
    "FUSED_PARTS",
    "MIXED_METHOD",
    "ExpertSet",
    "ModuleLayout",
    "PackedFormat",
    "PartLayout",
    "ServingLayout",
    "build_layout",
]

# SGLang module name -> the checkpoint modules it fuses, in shard order.
FUSED_PARTS: dict[str, tuple[str, ...]] = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
}
_PART_TO_FUSED = {part: (fused, i) for fused, parts in FUSED_PARTS.items() for i, part in enumerate(parts)}
# Expert projections: gate/up go to w13 (shard w1 / w3), down to w2.
_EXPERT_ROLE = {"gate_proj": "w1", "w1": "w1", "up_proj": "w3", "w3": "w3", "down_proj": "w2", "w2": "w2"}
_EXPERT = re.compile(r"^(?P<module>.+\.experts)\.(?P<expert>\d+)\.(?P<proj>[^.]+)\.weight$")
# Modules whose weights the model reads back itself after loading (DeepSeek MLA): never packed.
ALWAYS_DECODED = frozenset({"kv_b_proj", "q_a_proj", "kv_a_proj_with_mqa", "fused_qkv_a_proj_with_mqa"})

ServingMethod = Literal["packed", "unquantized", "decoded"]
MIXED_METHOD = "packed-mixed"  # method name of a FusedMoE served as several expert sets


@dataclass(frozen=True)
class PackedFormat:
    """How one weight is stored: a GPTQ format, or FP8 with one scale layout; ``None`` fields for plain."""

    gptq: GPTQFormat | None = None
    fp8: FP8Format | None = None
    fp8_scale: FP8Scale | None = None

    @property
    def is_quantized(self) -> bool:
        return self.gptq is not None or self.fp8 is not None

    @property
    def name(self) -> str:
        """``gptq-4bit-g128``, ``fp8-block128x128``, ``fp8-channel``, ... or ``unquantized``."""
        if self.gptq is not None:
            return self.gptq.name
        if self.fp8 is not None and self.fp8_scale is not None:
            return self.fp8.name(self.fp8_scale)
        return "unquantized"

    def compatible(self, other: PackedFormat) -> bool:
        """True when weights of both formats can share one packed module (per-tensor FP8 joins per-channel)."""
        if self.gptq is not None or other.gptq is not None:
            return self.gptq == other.gptq
        if self.fp8 != other.fp8:
            return False
        return _scale_group(self.fp8_scale) == _scale_group(other.fp8_scale)


def _scale_group(scale: FP8Scale | None) -> str | None:
    return "channel" if scale in (FP8Scale.CHANNEL, FP8Scale.TENSOR) else (scale.value if scale else None)


@dataclass(frozen=True)
class PartLayout:
    """One planned weight inside its SGLang module."""

    entry: PlanEntry
    shard: str | int | None  # "q"/"k"/"v", 0/1, "w1"/"w2"/"w3", or None for an unfused module
    expert: int | None
    format: PackedFormat
    out_features: int
    in_features: int
    stored_dtypes: tuple[tuple[str, torch.dtype], ...]  # stored part name -> dtype
    g_idx_nbytes: int = 0

    def dtype_of(self, suffix: str) -> torch.dtype | None:
        for name, dtype in self.stored_dtypes:
            if name.endswith("." + suffix):
                return dtype
        return None


@dataclass(frozen=True)
class ExpertSet:
    """The experts of a packed-mixed FusedMoE that share one format in one slot.

    ``slot`` is ``w13`` (gate and up projections) or ``w2`` (down); ``layout`` holds only
    this set's parts (method ``packed``, or ``unquantized`` for bf16 experts); ``experts``
    are the global expert ids in ascending order, the position of an id being its index
    in the set's stacked tensors.
    """

    slot: Literal["w13", "w2"]
    layout: ModuleLayout
    experts: tuple[int, ...]

    @property
    def format_name(self) -> str:
        return self.layout.format.name


@dataclass(frozen=True)
class ModuleLayout:
    """One SGLang Linear or FusedMoE module: its parts and how it is served."""

    name: str
    kind: Literal["linear", "moe"]
    parts: tuple[PartLayout, ...]
    method: ServingMethod
    reason: str = ""  # why a module is decoded
    expert_sets: tuple[ExpertSet, ...] = ()  # a packed-mixed FusedMoE's sets; empty otherwise

    @property
    def is_mixed(self) -> bool:
        return bool(self.expert_sets)

    def expert_formats(self) -> dict[str, int]:
        """Experts per format of a packed-mixed FusedMoE, most first (``gate/up A, down B`` where they differ)."""
        of: dict[str, dict[int, str]] = {"w13": {}, "w2": {}}
        for s in self.expert_sets:
            of[s.slot].update(dict.fromkeys(s.experts, s.format_name))
        counts: dict[str, int] = {}
        for e, up in sorted(of["w13"].items()):
            down = of["w2"].get(e, up)
            key = up if up == down else f"gate/up {up}, down {down}"
            counts[key] = counts.get(key, 0) + 1
        return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))

    def format_of(self, part: PartLayout) -> PackedFormat:
        """The format ``part`` is served in: its expert set's, or the module's."""
        for s in self.expert_sets:
            if part in s.layout.parts:
                return s.layout.format
        return self.format

    @property
    def precisions(self) -> tuple[Precision, ...]:
        return tuple(p for p in Precision if any(part.entry.precision == p for part in self.parts))

    @property
    def format(self) -> PackedFormat:
        """The format of a packed module (per-channel FP8 when its parts mix per-tensor and per-channel)."""
        formats = [p.format for p in self.parts]
        if any(f.fp8_scale == FP8Scale.CHANNEL for f in formats):
            return next(f for f in formats if f.fp8_scale == FP8Scale.CHANNEL)
        return formats[0]

    @property
    def method_name(self) -> str:
        """``unquantized``, ``decoded``, ``packed-mixed`` or the packed format's name."""
        if self.method != "packed":
            return self.method
        return MIXED_METHOD if self.is_mixed else self.format.name

    @property
    def method_text(self) -> str:
        """:attr:`method_name` with the expert formats of a packed-mixed module or the reason it is decoded."""
        if self.is_mixed:
            return f"{MIXED_METHOD} ({'; '.join(f'{n}: {c}' for n, c in self.expert_formats().items())} experts)"
        return self.method_name + (f" ({self.reason})" if self.reason else "")


@dataclass(frozen=True)
class ServingLayout:
    """Every module with at least one quantized part, by SGLang module name."""

    modules: dict[str, ModuleLayout]
    serve: Literal["packed", "decoded"]

    def find(self, prefix: str) -> ModuleLayout | None:
        """The module SGLang builds under ``prefix`` (models may leave the leading ``model.`` out)."""
        module = self.modules.get(prefix)
        if module is not None or not prefix:
            return module
        matches = [m for name, m in self.modules.items() if name.endswith("." + prefix)]
        return matches[0] if len(matches) == 1 else None


def entry_format(entry: PlanEntry, source: CheckpointSource) -> PackedFormat:
    """How ``entry`` is stored in ``source``."""
    parts = entry.stored_parts
    decoder = source.decoder
    if any(p.endswith(".qweight") for p in parts):
        return PackedFormat(gptq=decoder.settings)  # type: ignore[attr-defined]
    scale = next((p for p in parts if p.endswith((".weight_scale_inv", ".weight_scale"))), None)
    if scale is None:
        return PackedFormat()
    fmt: FP8Format = decoder.format  # type: ignore[attr-defined]
    kind = check_fp8_tensors(
        entry.name,
        torch.empty(source.shape(entry.name), dtype=torch.float8_e4m3fn, device="meta"),
        torch.empty(source.shape(scale), dtype=torch.float32, device="meta"),
        scale_is_inverse=scale.endswith("_inv"),
        fmt=fmt,
    )
    return PackedFormat(fp8=fmt, fp8_scale=kind)


def module_of(name: str) -> tuple[str, Literal["linear", "moe"], str | int | None, int | None] | None:
    """``(module, kind, shard, expert)`` of a checkpoint weight name, or None when it is no ``.weight``."""
    m = _EXPERT.match(name)
    if m is not None and m["proj"] in _EXPERT_ROLE:
        return m["module"], "moe", _EXPERT_ROLE[m["proj"]], int(m["expert"])
    if not name.endswith(".weight"):
        return None
    module = name[: -len(".weight")]
    parent, _, leaf = module.rpartition(".")
    if leaf in _PART_TO_FUSED:
        fused, index = _PART_TO_FUSED[leaf]
        shard: str | int = "qkv"[index] if fused == "qkv_proj" else index
        return f"{parent}.{fused}" if parent else fused, "linear", shard, None
    return module, "linear", None, None


def build_layout(
    plan: LoadPlan,
    sources: Mapping[Precision, CheckpointSource],
    serve: Literal["packed", "decoded"] = "packed",
) -> ServingLayout:
    """Group the plan's weights into SGLang modules and decide each module's serving method.

    Only modules with a quantized part are listed: every other module keeps SGLang's
    unquantized method. With ``serve="decoded"`` every listed module is decoded.
    """
    grouped: dict[str, tuple[str, list[PartLayout]]] = {}
    for entry in plan.entries:
        where = module_of(entry.name)
        if where is None:
            continue
        module, kind, shard, expert = where
        source = sources[entry.precision]
        dtypes = tuple((p, source.dtype(p)) for p in entry.stored_parts)
        fmt = entry_format(entry, source)
        out_features, in_features = _logical_shape(entry, source, fmt)
        g_idx = [p for p in entry.stored_parts if p.endswith(".g_idx")]
        part = PartLayout(entry, shard, expert, fmt, out_features, in_features, dtypes,
                          sum(source.nbytes(p) for p in g_idx))
        grouped.setdefault(module, (kind, []))[1].append(part)
    modules: dict[str, ModuleLayout] = {}
    for name, (kind, parts) in grouped.items():
        if not any(p.format.is_quantized for p in parts):
            continue
        method, reason, sets = _decide(name, kind, parts, serve)
        modules[name] = ModuleLayout(name, kind, tuple(parts), method, reason, sets)
    return ServingLayout(modules, serve)


def _logical_shape(entry: PlanEntry, source: CheckpointSource, fmt: PackedFormat) -> tuple[int, int]:
    if fmt.gptq is not None:
        rows, out = source.shape(entry.name.removesuffix(".weight") + ".qweight")[-2:]
        values, words = block_shape(fmt.gptq.bits)
        return out, rows // words * values
    shape = source.shape(entry.stored_parts[0])
    return (int(shape[0]), int(shape[1])) if len(shape) == 2 else (int(shape[0]) if shape else 1, 1)


def _decide(name: str, kind: str, parts: list[PartLayout], serve: str
            ) -> tuple[ServingMethod, str, tuple[ExpertSet, ...]]:
    if serve == "decoded":
        return "decoded", "mixed_precision.serve is decoded", ()
    if name.rpartition(".")[2] in ALWAYS_DECODED:
        return "decoded", "the model reads this weight back after loading", ()
    first = parts[0].format
    if not all(p.format.is_quantized and p.format.compatible(first) for p in parts):
        if kind == "moe":
            return _mixed_experts(name, parts)
        precisions = sorted({str(p.entry.precision) for p in parts})
        formats = sorted({p.format.name for p in parts})
        return "decoded", f"parts mix {', '.join(precisions)} ({', '.join(formats)})", ()
    bad = _misaligned(kind, parts)
    return ("decoded", bad, ()) if bad else ("packed", "", ())


def _misaligned(kind: str, parts: list[PartLayout] | tuple[PartLayout, ...]) -> str:
    """Why fused parts of one format cannot share a packed tensor, or ``""``.

    Fused parts are concatenated along the output dim: each boundary must fall on a whole
    packed word (GPTQ zeros) or a whole scale block (block FP8).
    """
    first = parts[0].format
    if first.gptq is not None:
        align = block_shape(first.gptq.bits)[0]
    elif first.fp8_scale == FP8Scale.BLOCK and first.fp8 is not None and first.fp8.weight_block_size:
        align = first.fp8.weight_block_size[0]
    else:
        align = 1
    fused = [p for p in parts if p.shard in ("q", "k", 0, "w1")] if kind == "moe" or len(parts) > 1 else []
    bad = [p for p in fused if p.out_features % align]
    if not bad:
        return ""
    return (f"fused parts join at output feature {bad[0].out_features}, not a multiple of {align} "
            f"({first.name} packs {align} output features together)")


def _format_key(fmt: PackedFormat) -> tuple[object, ...]:
    """Formats with equal keys share one packed set (see :meth:`PackedFormat.compatible`)."""
    return fmt.gptq, fmt.fp8, _scale_group(fmt.fp8_scale)


def _mixed_experts(name: str, parts: list[PartLayout]) -> tuple[ServingMethod, str, tuple[ExpertSet, ...]]:
    """The expert sets of a FusedMoE whose experts come in several formats (or why it is decoded)."""
    grouped: dict[tuple[str, tuple[object, ...]], list[PartLayout]] = {}
    for p in parts:
        slot = "w2" if p.shard == "w2" else "w13"
        grouped.setdefault((slot, _format_key(p.format)), []).append(p)
    w13_key: dict[int, tuple[object, ...]] = {}
    for (slot, key), members in grouped.items():
        for p in members:
            if slot != "w13":
                continue
            assert p.expert is not None
            if w13_key.setdefault(p.expert, key) != key:
                formats = sorted(q.format.name for q in parts if q.expert == p.expert and q.shard in ("w1", "w3"))
                return "decoded", (
                    f"expert {p.expert} has gate and up projections in different formats ({', '.join(formats)}); "
                    "they share one fused weight"), ()
    sets: list[ExpertSet] = []
    for (slot, _key), members in grouped.items():
        quantized = members[0].format.is_quantized
        bad = _misaligned("moe", members) if quantized else ""
        if bad:
            return "decoded", bad, ()
        experts = tuple(sorted({p.expert for p in members if p.expert is not None}))
        ordered = tuple(sorted(members, key=lambda p: (p.expert or 0, str(p.shard))))
        layout = ModuleLayout(name, "moe", ordered, "packed" if quantized else "unquantized")
        sets.append(ExpertSet(slot, layout, experts))  # type: ignore[arg-type]
    sets.sort(key=lambda s: (s.slot, -len(s.experts), s.format_name))
    return "packed", "", tuple(sets)


def gptq_groups(in_features: int, group_size: int) -> int:
    """Number of quantization groups along ``in_features``."""
    return 1 if group_size == -1 or group_size >= in_features else math.ceil(in_features / group_size)


def served_nbytes(layout: ServingLayout, plan: LoadPlan) -> dict[Precision, int]:
    """Bytes in memory per precision as the layout serves the plan (TP 1), before anything is built.

    A packed weight keeps its stored parts (``g_idx`` only with act-order; a per-tensor FP8
    scale grows to one per output feature); every other weight (bf16 experts of a
    packed-mixed module included) takes its decoded size.
    """
    packed = {p.entry.name: (m, p) for m in layout.modules.values() if m.method == "packed" for p in m.parts}
    out: dict[Precision, int] = {}
    for entry in plan.entries:
        nbytes = entry.bytes_loaded
        if entry.name in packed:
            module, part = packed[entry.name]
            fmt = module.format_of(part)
            keep_g_idx = bool(fmt.gptq and fmt.gptq.desc_act)
            nbytes = entry.bytes_on_disk - (0 if keep_g_idx else part.g_idx_nbytes)
            if not part.format.is_quantized:  # a bf16 expert of a packed-mixed module: the serving dtype
                nbytes = entry.bytes_loaded
            if part.format.fp8_scale == FP8Scale.TENSOR:
                nbytes += (part.out_features - 1) * 4
        out[entry.precision] = out.get(entry.precision, 0) + nbytes
    return {p: out[p] for p in Precision if p in out}


def format_layout(layout: ServingLayout, plan: LoadPlan) -> str:
    """Text report for ``--plan``: bytes per precision as served, and every module with a quantized part."""
    summary = plan.summary()
    served = served_nbytes(layout, plan)
    lines = [f"Serving (mixed_precision.serve: {layout.serve}; every other Linear / MoE module: unquantized)", ""]
    lines += _aligned_rows(
        ["precision", "on disk", "in memory"],
        [[str(p), format_bytes(t.bytes_on_disk), format_bytes(served.get(p, 0))] for p, t in summary.items()],
        right={1, 2},
    )
    lines.append("")
    lines += _aligned_rows(
        ["module", "precision", "method"],
        [[m.name, "+".join(str(p) for p in m.precisions), m.method_text] for m in layout.modules.values()],
        right=set(),
    )
    return "\n".join(lines)


def _aligned_rows(header: list[str], rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return [
        "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
        .rstrip()
        for r in [header, ["-" * w for w in widths], *rows]
    ]
