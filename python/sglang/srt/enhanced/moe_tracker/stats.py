"""Statistics from a :class:`TrackerSnapshot`: pure functions, host only.

:func:`expert_activation_stats` returns the documented structure::

    {
      "expert_stats": {"layer_{l}_expert_{e}": {layer_id, expert_id, activation_count,
                        last_activation_time, total_tokens_processed, ...}},
      "layer_stats":  {"{l}": {total_experts, total_activations, total_tokens,
                        "experts": {"{e}": {activation_count, total_tokens_processed, ...}}, ...}},
      "top_experts":  [{layer_id, expert_id, activation_count, total_tokens_processed, ...}],
      "requests":     [{request_id, input_length, output_length, time, ...}],
      "summary":      {num_layers, num_experts, total_passes, tracking_since, ...},
    }

Every expert of every MoE layer is listed, including experts never activated (counts 0,
``last_activation_time`` None), so ``total_experts`` is the layer's real expert count.
Token counts are routed tokens: a token sent to its top-k experts counts once for each, so
a layer's ``total_tokens`` is tokens x top_k. Extra keys beyond the original structure:
per expert and layer ``prefill_tokens``/``decode_tokens``/``prefill_activations``/
``decode_activations``; per expert ``share_of_layer_tokens``; per layer ``active_experts``
and ``load_balance``; ``requests``; ``summary``; ``request_experts`` (per-request expert use,
see :func:`request_expert_use`) when the snapshot carries it.

A snapshot of the last N passes (``snapshot.window``) gives the same structure over those
passes; ``summary.window`` then says how many passes it covers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from sglang.srt.enhanced.errors import EnhancedError
from sglang.srt.enhanced.moe_tracker.snapshot import DECODE, PREFILL, TrackerSnapshot


def expert_activation_stats(
    snapshot: TrackerSnapshot,
    layer_id: int | None = None,
    expert_id: int | None = None,
    top_k: int = 10,
) -> dict[str, Any]:
    """Statistics of ``snapshot`` in the documented structure.

    - no filter: every MoE layer;
    - ``layer_id``: the same structure restricted to that layer;
    - ``layer_id`` and ``expert_id``: that expert's ``expert_stats`` entry alone.

    Unknown layers or experts (or ``expert_id`` without ``layer_id``) raise
    :class:`EnhancedError` naming ``(layer_id, expert_id)``.
    """
    _check_filter(snapshot, layer_id, expert_id)
    layers = snapshot.layer_ids if layer_id is None else [layer_id]
    table = _Table(snapshot)
    if expert_id is not None:
        return table.expert(layer_id, expert_id)
    out = {
        "expert_stats": {
            f"layer_{layer}_expert_{e}": table.expert(layer, e)
            for layer in layers
            for e in range(table.num_experts)
        },
        "layer_stats": {str(layer): table.layer(layer) for layer in layers},
        "top_experts": table.top(layers, top_k),
        "requests": [dict(r) for r in snapshot.requests],
        "summary": summary(snapshot),
    }
    if snapshot.request_experts:
        out["request_experts"] = {rid: request_expert_use(snapshot, rid) for rid in snapshot.request_experts}
    return out


def request_expert_use(snapshot: TrackerSnapshot, request_id: str) -> dict[str, Any]:
    """One finished request's expert use: per MoE layer the experts it used and their tokens.

    ``{request_id, input_length, output_length, tokens_routed, expert_activations,
    layers: {"{l}": {experts: {"{e}": tokens}, distinct_experts, tokens}}}``; every MoE layer
    is listed. Unknown requests raise :class:`EnhancedError` naming the id.
    """
    triples = snapshot.request_experts.get(request_id)
    if triples is None:
        raise EnhancedError(f"no expert use recorded for request {request_id!r} (unknown, running, or "
                            "older than the records kept)", culprit=request_id)
    record = next((r for r in snapshot.requests if r["request_id"] == request_id), {})
    layers: dict[str, dict[str, Any]] = {str(layer): {"experts": {}, "distinct_experts": 0, "tokens": 0}
                                         for layer in snapshot.layer_ids}
    for layer, expert, tokens in triples:
        entry = layers.setdefault(str(layer), {"experts": {}, "distinct_experts": 0, "tokens": 0})
        entry["experts"][str(expert)] = tokens
        entry["distinct_experts"] += 1
        entry["tokens"] += tokens
    return {
        "request_id": request_id,
        "input_length": record.get("input_length"),
        "output_length": record.get("output_length"),
        "tokens_routed": sum(t for _, _, t in triples),
        "expert_activations": len(triples),
        "layers": layers,
    }


def coactivation_stats(snapshot: TrackerSnapshot, layer_id: int) -> dict[str, Any]:
    """Layer ``layer_id``'s co-activation counts: ``counts[a][b]`` = tokens that chose both a and b.

    The diagonal holds each expert's tokens. Raises :class:`EnhancedError` if the snapshot lacks the layer.
    """
    matrix = snapshot.coactivation.get(layer_id)
    if matrix is None:
        raise EnhancedError(f"no co-activation counts for layer {layer_id} (not a tracked MoE layer, or "
                            "co-activation counting is off)", culprit=(layer_id, None))
    return {"layer_id": layer_id, "num_experts": len(matrix), "top_k": snapshot.top_k,
            "since": snapshot.start_time, "counts": matrix}


def load_balance_by_layer(snapshot: TrackerSnapshot) -> dict[str, Any]:
    """``{layers: {"{l}": load_balance}, summary}`` of every MoE layer's token counts."""
    table = _Table(snapshot)
    return {"layers": {str(layer): load_balance(table._layer_tokens(layer)) for layer in snapshot.layer_ids},
            "summary": summary(snapshot)}


def layer_stats(snapshot: TrackerSnapshot) -> dict[str, dict[str, Any]]:
    """Per-layer statistics keyed by the layer id as a string."""
    table = _Table(snapshot)
    return {str(layer): table.layer(layer) for layer in snapshot.layer_ids}


def top_experts(snapshot: TrackerSnapshot, top_k: int = 10) -> list[dict[str, Any]]:
    """Experts with the most tokens, at most ``top_k``; ties go to the lower layer, then expert.

    Experts that got no token are never listed.
    """
    return _Table(snapshot).top(snapshot.layer_ids, top_k)


def load_balance(tokens: Sequence[int]) -> dict[str, float | None]:
    """Balance of one layer's per-expert token counts.

    - ``max_over_mean``: max / mean (1.0 = perfectly even, ``num_experts`` = one expert takes all);
    - ``coefficient_of_variation``: population std / mean (0.0 = even);
    - ``normalized_entropy``: H(p) / ln(num_experts) with p = tokens / sum (1.0 = even).

    All None when the layer has no tokens.
    """
    n, total = len(tokens), sum(tokens)
    if n == 0 or total == 0:
        return {"max_over_mean": None, "coefficient_of_variation": None, "normalized_entropy": None}
    mean = total / n
    variance = sum((t - mean) ** 2 for t in tokens) / n
    entropy = -sum((t / total) * math.log(t / total) for t in tokens if t > 0)
    return {
        "max_over_mean": max(tokens) / mean,
        "coefficient_of_variation": math.sqrt(variance) / mean,
        "normalized_entropy": entropy / math.log(n) if n > 1 else 1.0,
    }


def summary(snapshot: TrackerSnapshot) -> dict[str, Any]:
    """Totals over the reported layers and the tracking period."""
    layers = snapshot.layer_ids
    tokens = snapshot.tokens[:, layers].sum(dim=(1, 2)).tolist() if layers else [0, 0]
    lifetime = snapshot.lifetime_tokens[:, layers].sum().item() if layers else 0
    requests = snapshot.requests
    return {
        "num_layers": len(layers),
        "num_experts": snapshot.num_experts,
        "top_k": snapshot.top_k,
        "layer_ids": list(layers),
        "total_passes": snapshot.num_passes["prefill"] + snapshot.num_passes["decode"],
        "prefill_passes": snapshot.num_passes["prefill"],
        "decode_passes": snapshot.num_passes["decode"],
        "total_tokens": tokens[PREFILL] + tokens[DECODE],
        "prefill_tokens": tokens[PREFILL],
        "decode_tokens": tokens[DECODE],
        "num_requests": len(requests),
        "total_input_tokens": sum(r.get("input_length") or 0 for r in requests),
        "total_output_tokens": sum(r.get("output_length") or 0 for r in requests),
        "lifetime_passes": snapshot.lifetime_passes["prefill"] + snapshot.lifetime_passes["decode"],
        "lifetime_tokens": int(lifetime),
        "tracking_since": snapshot.start_time,
        "snapshot_time": snapshot.snapshot_time,
        "num_hidden_layers": snapshot.num_layers,
        **({"window": dict(snapshot.window)} if snapshot.window else {}),
    }


def _check_filter(snapshot: TrackerSnapshot, layer_id: int | None, expert_id: int | None) -> None:
    if expert_id is not None and layer_id is None:
        raise EnhancedError("expert_id needs layer_id", culprit=(layer_id, expert_id))
    if layer_id is not None and layer_id not in snapshot.layer_ids:
        raise EnhancedError(
            f"layer {layer_id} is not a tracked MoE layer (tracked: {snapshot.layer_ids})",
            culprit=(layer_id, expert_id),
        )
    if expert_id is not None and not 0 <= expert_id < snapshot.num_experts:
        raise EnhancedError(
            f"expert {expert_id} is outside [0, {snapshot.num_experts})", culprit=(layer_id, expert_id)
        )


class _Table:
    """The snapshot's counters as nested lists, for cheap per-entry access."""

    def __init__(self, snapshot: TrackerSnapshot) -> None:
        self.num_experts = snapshot.num_experts
        self.tokens = snapshot.tokens.tolist()
        self.acts = snapshot.activations.tolist()
        self.last = snapshot.last_activation_time.tolist()
        self.layer_totals = snapshot.tokens.sum(dim=(0, 2)).tolist()

    def _counts(self, layer: int, e: int) -> dict[str, int]:
        pt, dt = self.tokens[PREFILL][layer][e], self.tokens[DECODE][layer][e]
        pa, da = self.acts[PREFILL][layer][e], self.acts[DECODE][layer][e]
        return {
            "activation_count": pa + da,
            "total_tokens_processed": pt + dt,
            "prefill_tokens": pt,
            "decode_tokens": dt,
            "prefill_activations": pa,
            "decode_activations": da,
        }

    def _layer_tokens(self, layer: int) -> list[int]:
        return [p + d for p, d in zip(self.tokens[PREFILL][layer], self.tokens[DECODE][layer], strict=True)]

    def expert(self, layer: int, e: int) -> dict[str, Any]:
        counts = self._counts(layer, e)
        last = self.last[layer][e]
        tokens = counts.pop("total_tokens_processed")
        return {
            "layer_id": layer,
            "expert_id": e,
            "activation_count": counts.pop("activation_count"),
            "last_activation_time": last if last > 0 else None,
            "total_tokens_processed": tokens,
            **counts,
            "share_of_layer_tokens": _share(tokens, self.layer_totals[layer]),
        }

    def layer(self, layer: int) -> dict[str, Any]:
        experts = {str(e): self._counts(layer, e) for e in range(self.num_experts)}
        tokens = self._layer_tokens(layer)

        def total(key: str) -> int:
            return sum(x[key] for x in experts.values())

        return {
            "total_experts": self.num_experts,
            "total_activations": total("activation_count"),
            "total_tokens": total("total_tokens_processed"),
            "experts": experts,
            "active_experts": sum(1 for t in tokens if t > 0),
            "prefill_tokens": total("prefill_tokens"),
            "decode_tokens": total("decode_tokens"),
            "prefill_activations": total("prefill_activations"),
            "decode_activations": total("decode_activations"),
            "load_balance": load_balance(tokens),
        }

    def top(self, layers: Sequence[int], top_k: int) -> list[dict[str, Any]]:
        if top_k < 0:
            raise EnhancedError(f"top_k must be >= 0, got {top_k}", culprit="top_k")
        ranked = sorted(
            ((t, layer, e) for layer in layers for e, t in enumerate(self._layer_tokens(layer)) if t > 0),
            key=lambda x: (-x[0], x[1], x[2]),
        )
        out = []
        for _, layer, e in ranked[:top_k]:
            entry = self.expert(layer, e)
            out.append(
                {
                    key: entry[key]
                    for key in (
                        "layer_id",
                        "expert_id",
                        "activation_count",
                        "total_tokens_processed",
                        "last_activation_time",
                        "share_of_layer_tokens",
                    )
                }
            )
        return out


def _share(part: int, total: int) -> float:
    return part / total if total else 0.0
