"""Per-request expert use: tokens per (layer, expert) of each request, kept for the last K requests.

While a request runs, its tokens are counted on the device in the row of its request slot
(SGLang's request-pool index) by the pass fold (``ExpertCounters.request_counts``). When the
slot is released (the request finished, or a chunk of its prompt moved to another slot),
:meth:`RequestExpertUse.release` adds that row to the request's record and zeroes it: two
device ops, no host sync. Records live in a device ring of ``max_records`` rows; a request's
record is reported once the request has finished. The oldest record is dropped first.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any

import torch

from sglang.srt.enhanced.errors import EnhancedError

DEFAULT_MAX_RECORDS = 1000


class RequestExpertUse:
    """Records of finished requests' expert use on the device of ``slot_counts``."""

    def __init__(self, slot_counts: torch.Tensor, max_records: int = DEFAULT_MAX_RECORDS) -> None:
        if max_records < 1:
            raise EnhancedError(f"max_records must be >= 1, got {max_records}", culprit="max_records")
        self.slot_counts = slot_counts
        self.records = torch.zeros(max_records, *slot_counts.shape[1:], dtype=torch.int32,
                                   device=slot_counts.device)
        self._row_owner: list[str | None] = [None] * max_records
        self._open: dict[str, int] = {}  # running requests that already released a slot
        self._finished: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._next_row = 0

    @property
    def max_records(self) -> int:
        return self.records.shape[0]

    def release(self, slot: int, request_id: str, finished: bool) -> None:
        """Move slot ``slot``'s counts into ``request_id``'s record; ``finished`` closes the record."""
        row = self._open.get(request_id)
        if row is None:
            row = self._take_row(request_id)
            self.records[row].copy_(self.slot_counts[slot])
        else:
            self.records[row].add_(self.slot_counts[slot])
        self.slot_counts[slot].zero_()
        if finished:
            self._open.pop(request_id, None)
            self._finished.pop(request_id, None)
            self._finished[request_id] = {"row": row, "time": time.time()}
        else:
            self._open[request_id] = row

    def clear(self) -> None:
        """Forget every finished record (running requests keep counting)."""
        for meta in self._finished.values():
            self._row_owner[meta["row"]] = None
        self._finished.clear()

    def summaries(self) -> list[dict[str, Any]]:
        """Per finished request: ``request_id``, ``time``, ``tokens_routed`` and ``expert_activations``.

        ``tokens_routed`` sums the request's tokens over layers and experts (top-k per token and
        layer); ``expert_activations`` counts the (layer, expert) pairs it sent a token to.
        """
        if not self._finished:
            return []
        rows = torch.tensor([m["row"] for m in self._finished.values()], device=self.records.device)
        flat = self.records.index_select(0, rows).flatten(1)
        tokens = flat.sum(dim=1, dtype=torch.int64).tolist()
        pairs = (flat > 0).sum(dim=1).tolist()
        return [
            {"request_id": rid, "time": meta["time"], "tokens_routed": int(t), "expert_activations": int(p)}
            for (rid, meta), t, p in zip(self._finished.items(), tokens, pairs, strict=True)
        ]

    def expert_tokens(self, request_ids: list[str] | None) -> dict[str, list[list[int]]]:
        """``[layer, expert, tokens]`` for every nonzero count of the given finished requests (None = all)."""
        wanted = list(self._finished) if request_ids is None else [r for r in request_ids if r in self._finished]
        out: dict[str, list[list[int]]] = {}
        for rid in wanted:
            counts = self.records[self._finished[rid]["row"]].cpu()
            nonzero = counts.nonzero()
            out[rid] = [[int(layer), int(expert), int(counts[layer, expert])] for layer, expert in nonzero.tolist()]
        return out

    def _take_row(self, request_id: str) -> int:
        row = self._next_row
        self._next_row = (row + 1) % self.max_records
        owner = self._row_owner[row]
        if owner is not None:
            self._finished.pop(owner, None)
            if self._open.get(owner) == row:
                del self._open[owner]
        self._row_owner[row] = request_id
        return row
