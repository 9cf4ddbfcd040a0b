"""Prometheus counters of tokens and activations per (layer, expert) on ``/metrics``.

Only used with ``--enable-metrics``: SGLang then serves ``/metrics`` from its
multiprocess registry. Before each scrape a fresh snapshot is taken and the
counters are advanced to its lifetime (never reset) totals, and per-layer gauges
``sglang_enhanced_expert_load_max_over_mean{layer}`` / ``..._coefficient_of_variation{layer}``
are set from the last ``window`` forward passes (since the reset when there is no window).
``prometheus_client`` is imported only then, after SGLang has set ``PROMETHEUS_MULTIPROC_DIR``.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI

from sglang.srt.enhanced.errors import EnhancedError
from sglang.srt.enhanced.moe_tracker.exchange import StatsQuery
from sglang.srt.enhanced.moe_tracker.snapshot import PHASES, TrackerSnapshot
from sglang.srt.enhanced.moe_tracker.stats import load_balance
from sglang.srt.enhanced.moe_tracker.surfaces.asgi import before_each_request

logger = logging.getLogger(__name__)


class ExpertMetrics:
    """``sglang_enhanced_expert_tokens_total`` / ``..._activations_total`` {layer, expert, phase}."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge

        # Only this process sets the gauges; "mostrecent" keeps one series per layer.
        self.max_over_mean = Gauge("sglang_enhanced_expert_load_max_over_mean",
                                   "Busiest expert's tokens over the layer's mean, last passes", ["layer"],
                                   multiprocess_mode="mostrecent")
        self.coefficient_of_variation = Gauge("sglang_enhanced_expert_load_coefficient_of_variation",
                                              "Std/mean of the layer's tokens per expert, last passes", ["layer"],
                                              multiprocess_mode="mostrecent")
        labels = ["layer", "expert", "phase"]
        self.tokens = Counter("sglang_enhanced_expert_tokens", "Tokens routed to each expert", labels)
        self.activations = Counter(
            "sglang_enhanced_expert_activations", "Forward passes in which each expert got tokens", labels
        )
        self._exported: dict[tuple[str, int, int, int], int] = {}

    def update(self, snap: TrackerSnapshot) -> None:
        """Advance every counter to the snapshot's lifetime totals."""
        for kind, counter, values in (
            ("tokens", self.tokens, snap.lifetime_tokens),
            ("activations", self.activations, snap.lifetime_activations),
        ):
            for p, phase in enumerate(PHASES):
                for layer in snap.layer_ids:
                    row = values[p, layer].tolist()
                    for expert, total in enumerate(row):
                        key = (kind, p, layer, expert)
                        delta = total - self._exported.get(key, 0)
                        if delta > 0:
                            counter.labels(layer=str(layer), expert=str(expert), phase=phase).inc(delta)
                            self._exported[key] = total
        for layer in snap.layer_ids:
            balance = load_balance(snap.tokens[:, layer].sum(dim=0).tolist())
            for gauge, key in ((self.max_over_mean, "max_over_mean"),
                               (self.coefficient_of_variation, "coefficient_of_variation")):
                gauge.labels(layer=str(layer)).set(float("nan") if balance[key] is None else balance[key])


def add_metrics_refresh(
    app: FastAPI, snapshot: Callable[[StatsQuery], Awaitable[TrackerSnapshot]], window: int | None
) -> None:
    """Refresh the expert counters and balance gauges (last ``window`` passes) before ``/metrics`` answers."""
    state: dict[str, Any] = {}

    async def refresh_expert_metrics(path: str) -> None:
        if path.startswith("/metrics"):
            try:
                snap = await snapshot(StatsQuery(window=window))
                metrics = state.get("metrics") or state.setdefault("metrics", ExpertMetrics())
                metrics.update(snap)
            except EnhancedError as e:
                logger.warning("expert metrics not refreshed: %s", e)

    before_each_request(app, refresh_expert_metrics)
