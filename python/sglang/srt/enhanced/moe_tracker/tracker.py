"""ExpertActivationTracker: counts which experts each MoE router picks, per layer and phase.

Two ways in:

- the batched device path for routers, per forward pass::

      tracker.begin_pass(num_tokens, is_decode)     # host, outside CUDA graphs
      tracker.record_routing(layer_id, topk_ids)    # per MoE layer; capture-safe, one copy
      tracker.end_pass(real_num_tokens)             # host, outside graphs; no host sync

  A CUDA graph captured inside ``tracker.folding_in_graphs()`` holds the fold as well, so
  ``end_pass`` launches nothing for its replays.

- the host path of the original API: ``record_expert_activation`` / ``record_request``.

Beyond the totals since the last reset, the device path keeps (each optional): the last
``window_passes`` passes' counts (``snapshot(window=N)``), per-layer co-activation pair
counts and, once :meth:`enable_request_use` is called with the number of request slots,
each finished request's tokens per (layer, expert) (``begin_pass`` then takes each token's
slot; :meth:`release_request_slot` closes a slot).

Reports are built on the host from a :class:`TrackerSnapshot` (see ``stats.py``), so a
server process can report on snapshots taken in other processes.

Semantics per (layer, expert): ``activation_count`` = passes in which the expert got at
least one token; ``total_tokens_processed`` = tokens routed to it; ``last_activation_time``
= ``time.time()`` at the start (``begin_pass``) of its last active pass.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any, NamedTuple

import torch

from sglang.srt.enhanced.errors import EnhancedError
from sglang.srt.enhanced.moe_tracker import stats as _stats
from sglang.srt.enhanced.moe_tracker.counters import ExpertCounters
from sglang.srt.enhanced.moe_tracker.request_use import DEFAULT_MAX_RECORDS, RequestExpertUse
from sglang.srt.enhanced.moe_tracker.snapshot import DECODE, PHASES, PREFILL, TrackerSnapshot

DEFAULT_MAX_TOKENS = 256
DEFAULT_MAX_REQUESTS = 10_000
DEFAULT_WINDOW_PASSES = 1000


class _Pass(NamedTuple):
    """The pass between begin_pass and end_pass: its rows, phase, request slots, start time, ring slot."""

    num_tokens: int
    phase: int
    token_rows: torch.Tensor | None
    now: float
    ring: tuple[int, tuple[int, float] | None] | None


class ExpertActivationTracker:
    """Expert activation counters of one process.

    ``num_layers``/``num_experts``/``top_k``/``max_tokens``/``device`` size the device path's
    buffers; they may all be 0 for a host-path-only tracker, which grows as records arrive.
    ``layer_ids`` names the MoE layers to report (default: all ``num_layers``); layers
    recorded through the host path are added. ``max_requests`` bounds the request records
    kept (oldest dropped first). ``window_passes`` sizes the ring of recent passes (0 = none),
    ``coactivation`` turns the pair counts on.

    Host-side mutations and snapshots hold one lock; ``record_routing`` takes none (it only
    copies into the buffer chosen by ``begin_pass``).
    """

    def __init__(
        self,
        num_layers: int = 0,
        num_experts: int = 0,
        top_k: int = 0,
        *,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        device: torch.device | str = "cpu",
        layer_ids: Sequence[int] | None = None,
        max_requests: int = DEFAULT_MAX_REQUESTS,
        window_passes: int = DEFAULT_WINDOW_PASSES,
        coactivation: bool = True,
    ) -> None:
        routing = num_layers > 0 and num_experts > 0 and top_k > 0
        self._counters = ExpertCounters(num_layers, num_experts, top_k, max_tokens, device,
                                        window=window_passes if routing else 0,
                                        coactivation=coactivation and routing)
        if layer_ids is None:
            layer_ids = range(num_layers)
        bad = [i for i in layer_ids if i < 0 or (num_layers > 0 and i >= num_layers)]
        if bad:
            raise EnhancedError(f"layer ids {bad} are outside [0, {num_layers})", culprit=(bad[0], None))
        self.top_k = top_k
        self._layer_ids: set[int] = set(layer_ids)
        if self._layer_ids:
            self._counters.grow(max(self._layer_ids) + 1, num_experts)
            self._counters.flush_layer = max(self._layer_ids)
        self._lock = threading.Lock()
        self._requests: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._max_requests = max_requests
        self._num_passes = [0, 0]
        self._lifetime_passes = [0, 0]
        self._created_time = self._start_time = time.time()
        self._pass: _Pass | None = None
        # Ring of recent passes: host-side phase and time of each slot, next slot, slots filled.
        self._ring_meta: list[tuple[int, float]] = []
        self._ring_next = 0
        self.request_use: RequestExpertUse | None = None

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return self._counters.device

    @property
    def num_layers(self) -> int:
        return self._counters.num_layers

    @property
    def num_experts(self) -> int:
        return self._counters.num_experts

    @property
    def max_tokens(self) -> int:
        """Tokens per pass that fit the primary (CUDA-graph-safe) staging buffer."""
        return self._counters.capacity

    @property
    def routing_shape(self) -> tuple[int, int, int]:
        """``(num_layers, num_experts, top_k)`` the device path was sized for."""
        c = self._counters
        return c.routing_layers, c.routing_experts, c.top_k

    @property
    def in_pass(self) -> bool:
        return self._pass is not None

    # ------------------------------------------------------------------ device path
    @property
    def window_capacity(self) -> int:
        """Passes the ring of recent passes holds (0 = no ring)."""
        ring = self._counters.ring
        return 0 if ring is None else ring.shape[0]

    def enable_request_use(self, num_slots: int, max_records: int = DEFAULT_MAX_RECORDS) -> None:
        """Count each request's tokens per (layer, expert) in ``num_slots`` request slots."""
        with self._lock:
            if self.request_use is None:
                slots = self._counters.enable_request_slots(num_slots)
                self.request_use = RequestExpertUse(slots, max_records)

    def folding_in_graphs(self, token_rows: torch.Tensor | None = None) -> AbstractContextManager[None]:
        """Open around a CUDA-graph capture of passes: each graph then folds its own replays, and
        ``end_pass`` launches nothing for them. ``token_rows``: the graphs' input of each row's request
        slot (see ``ExpertCounters.folding_in_graphs``)."""
        return self._counters.folding_in_graphs(token_rows)

    @property
    def graphs_fold(self) -> bool:
        """Whether a CUDA graph captured in :meth:`folding_in_graphs` holds the fold."""
        return self._counters.graph_folds

    def warm_up(self) -> None:
        """Compile the device path's kernels now (CUDA), so no served pass waits for them."""
        self._counters.warm_up()

    def release_request_slot(self, slot: int, request_id: str, finished: bool) -> None:
        """Request ``request_id`` leaves slot ``slot``; ``finished`` closes its record. No host sync."""
        with self._lock:
            if self.request_use is not None:
                self.request_use.release(slot, request_id, finished)

    def begin_pass(self, num_tokens: int, is_decode: bool, token_rows: torch.Tensor | None = None) -> None:
        """Start a forward pass of ``num_tokens`` rows (include CUDA-graph padding rows here, except
        for graphs captured in :meth:`folding_in_graphs`, which count the ``num_tokens`` given here).

        Host side, outside graph capture. A pass larger than ``max_tokens`` stages into a
        separate, growable buffer and must run eagerly. ``token_rows`` (int64, on the device,
        one entry per real token, ``-1`` = none) is each token's request slot.
        """
        if num_tokens < 0:
            raise EnhancedError(f"num_tokens must be >= 0, got {num_tokens}", culprit="num_tokens")
        with self._lock:
            if not self._counters.routing_enabled:
                raise EnhancedError(
                    "the device path needs num_layers, num_experts and top_k > 0", culprit="tracker"
                )
            if self._pass is not None:
                raise EnhancedError("begin_pass called again before end_pass", culprit="tracker")
            self._counters.select(num_tokens)
            rows = token_rows if self.request_use is not None else None
            phase, now = DECODE if is_decode else PREFILL, time.time()
            ring = self._ring_slot(phase, now) if num_tokens > 0 and self.window_capacity else None
            self._counters.write_pass_params(num_tokens, phase, now, 0 if ring is None else ring[0])
            self._pass = _Pass(num_tokens, phase, rows, now, ring)

    def record_routing(self, layer_id: int, topk_ids: torch.Tensor) -> None:
        """Stage the router's choice ``topk_ids`` ``[num_tokens, top_k]`` of MoE layer ``layer_id``.

        Safe inside CUDA-graph capture: no allocation, no sync, no histogram. The ids are
        copied into a preallocated buffer when the last MoE layer (the highest of
        ``layer_ids``) records, all layers in one copy, so ``topk_ids`` must not be changed
        in place before then. Ids ``< 0`` (padding) or ``>= num_experts`` are ignored when
        the pass is folded. Every MoE layer must record every row of the pass's real tokens.
        """
        self._counters.record(layer_id, topk_ids)

    def end_pass(self, num_tokens: int | None = None) -> None:
        """Fold the pass into the totals, counting only its first ``num_tokens`` rows.

        ``num_tokens`` defaults to the count given to :meth:`begin_pass`; pass the real token
        count to leave out CUDA-graph padding rows. Host side, outside graphs; no host sync.
        """
        with self._lock:
            if self._pass is None:
                raise EnhancedError("end_pass called without begin_pass", culprit="tracker")
            p = self._pass
            begun = p.num_tokens
            count = begun if num_tokens is None else num_tokens
            if not 0 <= count <= begun:
                self._drop_pass()
                raise EnhancedError(
                    f"end_pass num_tokens={count} is outside [0, {begun}] (begin_pass)", culprit="num_tokens"
                )
            if count == 0:
                self._unring(p.ring)
            rows = p.token_rows if p.token_rows is not None and p.token_rows.numel() >= count else None
            ring_slot = p.ring[0] if p.ring is not None and count > 0 else None
            self._counters.fold(count, p.phase, p.now, clear_rows=begun, ring_slot=ring_slot, token_rows=rows)
            if count > 0:
                self._num_passes[p.phase] += 1
                self._lifetime_passes[p.phase] += 1
            self._pass = None

    def abort_pass(self) -> None:
        """Drop the current pass (e.g. its forward raised) without counting it."""
        with self._lock:
            self._drop_pass()

    def _drop_pass(self) -> None:
        if self._pass is not None:
            self._counters.discard(self._pass.num_tokens)
            self._unring(self._pass.ring)
            self._pass = None

    # ------------------------------------------------------------------ host path
    def record_expert_activation(
        self,
        layer_id: int,
        expert_id: int,
        tokens_processed: int = 1,
        request_id: str | None = None,
        *,
        is_decode: bool = False,
    ) -> None:
        """Record one activation of ``(layer_id, expert_id)`` that processed ``tokens_processed`` tokens.

        Grows the counters for unseen layers/experts. ``tokens_processed == 0`` records no
        activation (an activation needs at least one token). With ``request_id`` the
        request's record counts the activation too.
        """
        if layer_id < 0 or expert_id < 0:
            raise EnhancedError("layer and expert ids must be >= 0", culprit=(layer_id, expert_id))
        if tokens_processed < 0:
            raise EnhancedError(
                f"tokens_processed must be >= 0, got {tokens_processed}", culprit=(layer_id, expert_id)
            )
        now = time.time()
        with self._lock:
            if tokens_processed > 0:
                self._counters.add(
                    layer_id, expert_id, tokens_processed, DECODE if is_decode else PREFILL, now
                )
                self._layer_ids.add(layer_id)
            if request_id is not None:
                record = self._request_record(request_id, now)
                record["expert_activations"] += 1 if tokens_processed > 0 else 0
                record["tokens_routed"] += tokens_processed

    def record_request(self, request_id: str, input_length: int, output_length: int) -> None:
        """Record a finished request's prompt and output lengths."""
        if input_length < 0 or output_length < 0:
            raise EnhancedError(
                f"lengths must be >= 0, got input {input_length}, output {output_length}", culprit=request_id
            )
        now = time.time()
        with self._lock:
            record = self._request_record(request_id, now)
            record.update(input_length=int(input_length), output_length=int(output_length), time=now)

    # ------------------------------------------------------------------ reports
    def snapshot(
        self,
        window: int | None = None,
        request_ids: Sequence[str] | None = (),
        coactivation_layers: Sequence[int] = (),
    ) -> TrackerSnapshot:
        """A CPU copy of the counters (syncs with the device).

        ``window``: the counts of the last ``window`` passes instead of those since the reset
        (the lifetime totals stay). ``request_ids``: whose per-(layer, expert) tokens to include
        (None = every finished request). ``coactivation_layers``: layers whose pair counts to include
        (layers it does not track, or all with co-activation off, are left out).
        """
        with self._lock:
            totals = self._counters.to_cpu()
            num_passes = dict(zip(PHASES, self._num_passes, strict=True))
            window_info = None
            if window is not None:
                totals.update(self._window_totals(window))
                num_passes = totals.pop("num_passes")
                window_info = {"requested": window, "passes": sum(num_passes.values()),
                               "capacity": self.window_capacity}
            requests = self._merged_requests()
            use = self.request_use
            return TrackerSnapshot(
                num_layers=self._counters.num_layers,
                num_experts=self._counters.num_experts,
                top_k=self.top_k,
                layer_ids=sorted(self._layer_ids),
                num_passes=num_passes,
                lifetime_passes=dict(zip(PHASES, self._lifetime_passes, strict=True)),
                requests=requests,
                start_time=self._start_time,
                created_time=self._created_time,
                snapshot_time=time.time(),
                window=window_info,
                request_experts=use.expert_tokens(None if request_ids is None else list(request_ids))
                if use is not None and request_ids != () else {},
                coactivation=self._coactivation(coactivation_layers, totals["tokens"]),
                **totals,
            )

    def _merged_requests(self) -> list[dict[str, Any]]:
        """Host records, with the device path's per-request expert use added (by request id)."""
        records = {rid: dict(r) for rid, r in self._requests.items()}
        if self.request_use is not None:
            for use in self.request_use.summaries():
                record = records.get(use["request_id"])
                if record is None:
                    records[use["request_id"]] = {"input_length": None, "output_length": None, **use}
                else:
                    record["expert_activations"] += use["expert_activations"]
                    record["tokens_routed"] += use["tokens_routed"]
        return sorted(records.values(), key=lambda r: r.get("time") or 0.0)

    def _ring_slot(self, phase: int, now: float) -> tuple[int, tuple[int, float] | None]:
        """Take the ring's next slot for a pass; returns it and what it held (for :meth:`_unring`)."""
        slot = self._ring_next
        held = None
        if slot < len(self._ring_meta):
            held = self._ring_meta[slot]
            self._ring_meta[slot] = (phase, now)
        else:
            self._ring_meta.append((phase, now))
        self._ring_next = (slot + 1) % self.window_capacity
        return slot, held

    def _unring(self, taken: tuple[int, tuple[int, float] | None] | None) -> None:
        """Give back the ring slot a pass took (it counted no token)."""
        if taken is None:
            return
        slot, held = taken
        if held is None:
            self._ring_meta.pop()
        else:
            self._ring_meta[slot] = held
        self._ring_next = slot

    def _window_totals(self, window: int) -> dict[str, Any]:
        """Counters of the last ``window`` passes (as many as the ring holds), on the CPU."""
        if window < 1:
            raise EnhancedError(f"window must be >= 1 passes, got {window}", culprit="window")
        if not self.window_capacity:
            raise EnhancedError("this tracker keeps no window of recent passes", culprit="window")
        cap = self.window_capacity
        n = min(window, len(self._ring_meta))
        slots = [(self._ring_next - 1 - i) % cap for i in range(n)]
        ring = self._counters.ring
        shape = (2, self._counters.num_layers, self._counters.num_experts)
        tokens = torch.zeros(shape, dtype=torch.int64)
        activations = torch.zeros(shape, dtype=torch.int64)
        last = torch.zeros(shape[1:], dtype=torch.float64)
        nl, ne = ring.shape[1:]
        for phase in (PREFILL, DECODE):
            chosen = [s for s in slots if self._ring_meta[s][0] == phase]
            if not chosen:
                continue
            sel = ring.index_select(0, torch.tensor(chosen, device=ring.device))
            tokens[phase, :nl, :ne] = sel.sum(dim=0, dtype=torch.int64).cpu()
            activations[phase, :nl, :ne] = (sel > 0).sum(dim=0).cpu()
            times = torch.tensor([self._ring_meta[s][1] for s in chosen], dtype=torch.float64, device=ring.device)
            seen = torch.where(sel > 0, times.view(-1, 1, 1), torch.zeros((), dtype=torch.float64,
                                                                          device=ring.device)).amax(dim=0).cpu()
            torch.maximum(last[:nl, :ne], seen, out=last[:nl, :ne])
        passes = {p: sum(1 for s in slots if self._ring_meta[s][0] == i) for i, p in enumerate(PHASES)}
        return {"tokens": tokens, "activations": activations, "last_activation_time": last, "num_passes": passes}

    def _coactivation(self, layers: Sequence[int], tokens: torch.Tensor) -> dict[int, list[list[int]]]:
        """Symmetric E x E pair counts (tokens per expert on the diagonal) of the asked layers it tracks."""
        pairs = self._counters.coactivation
        if pairs is None:
            return {}
        out = {}
        for layer in layers:
            if 0 <= layer < pairs.shape[0] and layer in self._layer_ids:
                upper = pairs[layer].cpu()
                full = upper + upper.T
                full.diagonal().copy_(tokens[:, layer, : full.shape[0]].sum(dim=0))
                out[int(layer)] = full.tolist()
        return out

    def get_expert_stats(self, layer_id: int | None = None, expert_id: int | None = None) -> dict[str, Any]:
        """Statistics in the documented JSON structure; see :func:`stats.expert_activation_stats`."""
        return _stats.expert_activation_stats(self.snapshot(), layer_id=layer_id, expert_id=expert_id)

    def get_top_experts(self, top_k: int = 10) -> list[dict[str, Any]]:
        """The ``top_k`` experts with the most tokens (ties: lower layer, then lower expert first)."""
        return _stats.top_experts(self.snapshot(), top_k=top_k)

    def get_layer_stats(self) -> dict[int, dict[str, Any]]:
        """Per-layer statistics keyed by the integer layer id."""
        return {int(k): v for k, v in _stats.layer_stats(self.snapshot()).items()}

    def reset_stats(self) -> None:
        """Zero the resettable counters and request records; lifetime totals are kept."""
        with self._lock:
            self._counters.reset()
            self._num_passes = [0, 0]
            self._requests.clear()
            if self.request_use is not None:
                self.request_use.clear()
            self._start_time = time.time()

    def export_stats(self, file_path: str) -> None:
        """Write the statistics to ``file_path`` (.json, .csv, .png or .sglang.json; other names get JSON).

        The JSON export includes every kept request's expert use.
        """
        from sglang.srt.enhanced.moe_tracker.export import export_stats

        export_stats(self.snapshot(request_ids=None), file_path)

    # ------------------------------------------------------------------ internals
    def _request_record(self, request_id: str, now: float) -> dict[str, Any]:
        record = self._requests.get(request_id)
        if record is None:
            record = {
                "request_id": request_id,
                "input_length": None,
                "output_length": None,
                "time": now,
                "expert_activations": 0,
                "tokens_routed": 0,
            }
            self._requests[request_id] = record
            while len(self._requests) > self._max_requests:
                self._requests.popitem(last=False)
        else:
            self._requests.move_to_end(request_id)
        return record


_GLOBAL_TRACKER: ExpertActivationTracker | None = None


def get_global_expert_tracker() -> ExpertActivationTracker | None:
    """The process-wide tracker, or None when expert tracking is off."""
    return _GLOBAL_TRACKER


def set_global_expert_tracker(tracker: ExpertActivationTracker | None) -> None:
    """Install (or with None, remove) the process-wide tracker."""
    global _GLOBAL_TRACKER
    _GLOBAL_TRACKER = tracker
