"""What the loaded model holds, per precision and per module, from its actual parameters.

Every parameter is traced back to the planned weights it was loaded from: a packed
module's parameters to its parts; a FusedMoE's ``w13_*`` / ``w2_*`` to its experts'
gate+up / down projections; a fused Linear's ``weight`` / ``bias`` to its parts'; other
parameters to the weight of the same name; a packed-mixed FusedMoE's parameters to the
experts of their own set. A parameter loaded from weights of several precisions (a decoded
mixed module) is split between them in proportion to their sizes. A packed-mixed module's
entry also lists its ``formats``: experts per format.
Each TP rank writes its report as JSON to the launcher's state folder; the HTTP server
sums the bytes in memory over ranks (:func:`merge_reports`).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from torch import nn

from sglang.srt.enhanced.config import Precision
from sglang.srt.enhanced.mixed_precision.plan import LoadPlan, PlanEntry
from sglang.srt.enhanced.mixed_precision.serving.layout import FUSED_PARTS, ServingLayout, module_of

__all__ = ["REPORT_PREFIX", "memory_report", "merge_reports", "read_reports", "write_report"]

REPORT_PREFIX = "mixed-precision-rank"
_FUSED_BY_PART = {part: fused for fused, parts in FUSED_PARTS.items() for part in parts}
_EXPERT_SLOT = re.compile(r"^(w13|w2)_")


def _slot_of_entry(entry_name: str) -> tuple[str, str] | None:
    """``(SGLang module, slot)`` a planned weight is loaded into; slot ``w13``/``w2`` for experts."""
    where = module_of(entry_name)
    if where is not None:
        module, kind, shard, _expert = where
        if kind == "moe":
            return module, "w2" if shard == "w2" else "w13"
        return module, "weight"
    module, _, leaf = entry_name.rpartition(".")
    parent, _, proj = module.rpartition(".")
    if proj in _FUSED_BY_PART:
        return f"{parent}.{_FUSED_BY_PART[proj]}", leaf
    return module, leaf


def _slot_of_param(module_name: str, param_name: str, packed: bool) -> tuple[str, str]:
    m = _EXPERT_SLOT.match(param_name)
    if m is not None:
        return module_name, m.group(1)
    if packed and param_name != "bias":
        return module_name, "weight"
    return module_name, param_name


def memory_report(
    model: nn.Module, plan: LoadPlan, layout: ServingLayout, *, tp_rank: int = 0, tp_size: int = 1
) -> dict[str, Any]:
    """This rank's ``/mixed_precision`` report (see the README for the format)."""
    from sglang.srt.enhanced.mixed_precision.serving.methods import (
        PackedLinearMethod,
        PackedMixedMoEMethod,
        PackedMoEMethod,
    )
    from sglang.srt.layers.linear import LinearBase
    from sglang.srt.layers.moe.fused_moe_triton.layer import FusedMoE

    by_slot: dict[tuple[str, str], list[PlanEntry]] = {}
    for entry in plan.entries:
        slot = _slot_of_entry(entry.name)
        if slot is not None:
            by_slot.setdefault(slot, []).append(entry)

    in_memory: dict[Precision, float] = {}
    modules: dict[str, dict[str, str]] = {}
    for module_name, module in model.named_modules():
        method = getattr(module, "quant_method", None)
        packed = isinstance(method, (PackedLinearMethod, PackedMoEMethod))
        mixed = isinstance(method, PackedMixedMoEMethod)
        precisions: set[Precision] = set()
        for param_name, param in module.named_parameters(recurse=False):
            if mixed:
                entries = list(method.entries_of(param_name))
            else:
                entries = by_slot.get(_slot_of_param(module_name, param_name, packed), [])
            nbytes = param.numel() * param.element_size()
            total = sum(e.bytes_loaded for e in entries)
            for e in entries:
                share = nbytes * e.bytes_loaded / total if total else nbytes / len(entries)
                in_memory[e.precision] = in_memory.get(e.precision, 0.0) + share
                precisions.add(e.precision)
        if isinstance(module, (LinearBase, FusedMoE)):
            found = layout.find(module_name)
            name = method.layout.method_name if packed else ("decoded" if found is not None else "unquantized")
            modules[module_name] = {
                "precision": "+".join(str(p) for p in Precision if p in precisions) or "none",
                "method": name,
            }
            if mixed:
                modules[module_name]["formats"] = method.layout.expert_formats()

    summary = plan.summary()
    precisions_out = {
        str(p): {
            "tensors": totals.tensors,
            "bytes_on_disk": totals.bytes_on_disk,
            "bytes_in_memory": round(in_memory.get(p, 0.0)),
        }
        for p, totals in summary.items()
    }
    return {"serve": layout.serve, "tp_rank": tp_rank, "tp_size": tp_size,
            "precisions": precisions_out, "modules": modules}


def write_report(state_dir: Path, report: Mapping[str, Any]) -> Path:
    """Atomically write one rank's report; returns its path."""
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / f"{REPORT_PREFIX}{int(report.get('tp_rank', 0))}.json"
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(report))
    os.replace(tmp, path)
    return path


def read_reports(state_dir: Path) -> list[dict[str, Any]]:
    """Every rank's report in the state folder, rank 0 first."""
    paths = sorted(state_dir.glob(f"{REPORT_PREFIX}*.json"), key=lambda p: int(p.stem.removeprefix(REPORT_PREFIX)))
    return [json.loads(p.read_text()) for p in paths]


def merge_reports(reports: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """One report for the whole server: bytes in memory summed over ranks, the rest from rank 0."""
    reports = list(reports)
    first = reports[0]
    precisions = {p: dict(v) for p, v in first["precisions"].items()}
    for other in reports[1:]:
        for p, v in other["precisions"].items():
            precisions.setdefault(p, {**v, "bytes_in_memory": 0})
            if other is not first:
                precisions[p]["bytes_in_memory"] += v["bytes_in_memory"]
    return {"serve": first["serve"], "precisions": precisions, "modules": first["modules"]}
