"""A point-in-time copy of a tracker's counters: plain, picklable, JSON-able, mergeable."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch

from sglang.srt.enhanced.errors import EnhancedError

PREFILL, DECODE = 0, 1
PHASES = ("prefill", "decode")

_COUNTER_FIELDS = ("tokens", "activations", "lifetime_tokens", "lifetime_activations")


@dataclasses.dataclass
class TrackerSnapshot:
    """Counters of one tracker (or the sum of several) on the CPU.

    Phase-split tensors have shape ``[2, num_layers, num_experts]`` (index 0 = prefill,
    1 = decode) and dtype int64:

    - ``tokens``: tokens routed to each expert since the last reset (a token that picks an
      expert in its top-k counts once for that expert).
    - ``activations``: forward passes since the last reset in which the expert got >= 1 token.
    - ``lifetime_tokens`` / ``lifetime_activations``: the same, never reset (monotonic).

    ``last_activation_time`` is ``[num_layers, num_experts]`` float64 wall time
    (``time.time()``) of the expert's last active pass since the last reset; 0.0 means never.
    ``layer_ids`` are the MoE layers to report (dense layers are left out).
    ``num_passes`` / ``lifetime_passes`` count passes with at least one token, by phase.
    ``requests`` holds records ``{request_id, input_length, output_length, time,
    expert_activations, tokens_routed}``.

    Optional parts: ``window`` (``{requested, passes, capacity}``) when the counters are those
    of the last passes rather than since the reset; ``request_experts`` (request id ->
    ``[[layer, expert, tokens], ...]``, nonzero counts only); ``coactivation`` (layer ->
    symmetric ``[experts][experts]`` counts of tokens that chose both experts, tokens per expert
    on the diagonal).
    """

    num_layers: int
    num_experts: int
    top_k: int
    layer_ids: list[int]
    tokens: torch.Tensor
    activations: torch.Tensor
    last_activation_time: torch.Tensor
    lifetime_tokens: torch.Tensor
    lifetime_activations: torch.Tensor
    num_passes: dict[str, int]
    lifetime_passes: dict[str, int]
    requests: list[dict[str, Any]]
    start_time: float
    created_time: float
    snapshot_time: float
    window: dict[str, int] | None = None
    request_experts: dict[str, list[list[int]]] = dataclasses.field(default_factory=dict)
    coactivation: dict[int, list[list[int]]] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain Python (lists, ints, floats) for JSON or any transport."""
        out: dict[str, Any] = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, torch.Tensor):
                value = value.tolist()
            elif isinstance(value, dict):
                value = dict(value)
            elif isinstance(value, list):
                value = [dict(v) if isinstance(v, dict) else v for v in value]
            out[field.name] = value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrackerSnapshot:
        """Inverse of :meth:`to_dict`."""
        fields = dataclasses.fields(cls)
        required = {f.name for f in fields if f.default is dataclasses.MISSING
                    and f.default_factory is dataclasses.MISSING}
        missing = required - set(data)
        if missing:
            raise EnhancedError(f"snapshot dict lacks keys {sorted(missing)}", culprit="snapshot")
        kw = {f.name: data[f.name] for f in fields if f.name in data}
        num_layers, num_experts = int(kw["num_layers"]), int(kw["num_experts"])
        for name in _COUNTER_FIELDS:
            kw[name] = _as_tensor(kw[name], torch.int64, (2, num_layers, num_experts), name)
        kw["last_activation_time"] = _as_tensor(
            kw["last_activation_time"], torch.float64, (num_layers, num_experts), "last_activation_time"
        )
        kw["layer_ids"] = [int(i) for i in kw["layer_ids"]]
        kw["num_passes"] = {p: int(kw["num_passes"].get(p, 0)) for p in PHASES}
        kw["lifetime_passes"] = {p: int(kw["lifetime_passes"].get(p, 0)) for p in PHASES}
        kw["requests"] = [dict(r) for r in kw["requests"]]
        kw["request_experts"] = {str(k): [list(map(int, t)) for t in v]
                                 for k, v in (kw.get("request_experts") or {}).items()}
        kw["coactivation"] = {int(k): v for k, v in (kw.get("coactivation") or {}).items()}
        return cls(**kw)

    @classmethod
    def merge(cls, snapshots: Sequence[TrackerSnapshot]) -> TrackerSnapshot:
        """Sum snapshots of processes that saw disjoint tokens (e.g. data-parallel ranks).

        Counts and passes add, the last activation time is the latest, layers are the union,
        shapes grow to the largest; ``start_time``/``created_time`` are the earliest.
        Do not merge tensor-parallel ranks: they see the same tokens.
        """
        if not snapshots:
            raise EnhancedError("nothing to merge", culprit="snapshots")
        num_layers = max(s.num_layers for s in snapshots)
        num_experts = max(s.num_experts for s in snapshots)
        counters = {
            name: torch.zeros(2, num_layers, num_experts, dtype=torch.int64) for name in _COUNTER_FIELDS
        }
        last = torch.zeros(num_layers, num_experts, dtype=torch.float64)
        for snap in snapshots:
            nl, ne = snap.num_layers, snap.num_experts
            for name in _COUNTER_FIELDS:
                counters[name][:, :nl, :ne] += getattr(snap, name)
            torch.maximum(last[:nl, :ne], snap.last_activation_time, out=last[:nl, :ne])
        requests = merge_requests([r for s in snapshots for r in s.requests])
        request_experts: dict[str, list[list[int]]] = {}
        for snap in snapshots:
            for rid, triples in snap.request_experts.items():
                request_experts[rid] = _add_triples(request_experts.get(rid, []), triples)
        coactivation: dict[int, list[list[int]]] = {}
        for snap in snapshots:
            for layer, matrix in snap.coactivation.items():
                held = coactivation.get(layer)
                coactivation[layer] = matrix if held is None else (
                    torch.tensor(held) + torch.tensor(matrix)).tolist()
        windows = [s.window for s in snapshots if s.window is not None]
        return cls(
            num_layers=num_layers,
            num_experts=num_experts,
            top_k=max(s.top_k for s in snapshots),
            layer_ids=sorted({i for s in snapshots for i in s.layer_ids}),
            last_activation_time=last,
            num_passes={p: sum(s.num_passes[p] for s in snapshots) for p in PHASES},
            lifetime_passes={p: sum(s.lifetime_passes[p] for s in snapshots) for p in PHASES},
            requests=requests,
            start_time=min(s.start_time for s in snapshots),
            created_time=min(s.created_time for s in snapshots),
            snapshot_time=max(s.snapshot_time for s in snapshots),
            window={"requested": windows[0]["requested"], "passes": sum(w["passes"] for w in windows),
                    "capacity": max(w["capacity"] for w in windows)} if windows else None,
            request_experts=request_experts,
            coactivation=coactivation,
            **counters,
        )


def merge_requests(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per request id: lengths from whichever record has them, expert use summed."""
    merged: dict[str, dict[str, Any]] = {}
    for record in records:
        held = merged.get(record["request_id"])
        if held is None:
            merged[record["request_id"]] = dict(record)
            continue
        for key, value in record.items():
            if key in ("expert_activations", "tokens_routed"):
                held[key] = (held.get(key) or 0) + (value or 0)
            elif held.get(key) is None:
                held[key] = value
    return sorted(merged.values(), key=lambda r: r.get("time") or 0.0)


def _add_triples(a: list[list[int]], b: list[list[int]]) -> list[list[int]]:
    totals: dict[tuple[int, int], int] = {}
    for layer, expert, tokens in (*a, *b):
        totals[(layer, expert)] = totals.get((layer, expert), 0) + tokens
    return [[layer, expert, tokens] for (layer, expert), tokens in sorted(totals.items())]


def _as_tensor(value: Any, dtype: torch.dtype, shape: tuple[int, ...], name: str) -> torch.Tensor:
    tensor = torch.as_tensor(value, dtype=dtype)
    if tuple(tensor.shape) != shape and tensor.numel() == 0 and 0 in shape:
        tensor = tensor.reshape(shape)
    if tuple(tensor.shape) != shape:
        raise EnhancedError(f"snapshot field has shape {tuple(tensor.shape)}, expected {shape}", culprit=name)
    return tensor
