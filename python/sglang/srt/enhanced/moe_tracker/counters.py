"""Expert counters on the routers' device: a graph-safe staging buffer and folded totals.

One forward pass goes::

    record(layer, topk_ids)  # per MoE layer: keeps a reference; capture-safe
    ...                      # at the last MoE layer: one multi-tensor copy into the staging buffer
    fold(num_tokens, phase)  # once, after the pass (or captured in its graph): histogram added to the totals

``record`` allocates nothing, never syncs and calls no histogram op, so it may run inside
CUDA-graph capture. The copies are deferred to the pass's last MoE layer
(``flush_layer``) and done there by one ``torch._foreach_copy_``, one kernel instead of one
per layer (in a CUDA graph as in eager mode). The references held until then keep the
allocator from reusing the routers' id tensors; a caller must not change an id tensor in
place before that layer has recorded. ``fold`` reads nothing back to the host. On CUDA it
is one Triton kernel (``fold_kernel.fold_pass``); on the CPU a few numpy calls on views of
the same tensors (a torch op costs several microseconds there, a numpy call one); on
other devices it builds one ``[layers, experts + 1]`` histogram with ``scatter_add_``
(padding ids ``-1`` and out-of-range ids land in the extra column) and updates the
totals with a few torch ops.

In CUDA graphs (:meth:`ExpertCounters.folding_in_graphs`) the fold is captured with the
records, at the last MoE layer: it then reads the pass's token count, phase, time and ring
slot from a small device tensor (``pass_params``) that the host writes before each replay
through a pinned buffer, so a replayed pass costs the host one copy instead of a launch.

Optional per-pass outputs, all updated by the same fold (so still no host sync): a ring of
the last ``window`` passes' histograms (``ring``, int32 ``[window, layers, experts]``),
per-request-slot counts (``request_counts``, int32 ``[slots, layers, experts]``, sized by
:meth:`enable_request_slots`; each token's slot comes with the pass) and per-layer
co-activation pair counts (``coactivation``, int64 ``[layers, experts, experts]``, pair
``a < b`` at ``[layer, a, b]``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from sglang.srt.enhanced.errors import EnhancedError
from sglang.srt.enhanced.moe_tracker.snapshot import PHASES

EMPTY = -1
FOLD_IMPLS = ("triton", "numpy", "torch")
# Values a fold captured in a CUDA graph reads per pass (fold_kernel.encode_pass_params).
PASS_PARAMS = 5


@dataclass
class PassOutputs:
    """Optional outputs of a fold (see ``fold_kernel``); None = not kept."""

    ring: torch.Tensor | None = None
    ring_slot: int = 0
    request_counts: torch.Tensor | None = None
    token_rows: torch.Tensor | None = None
    coactivation: torch.Tensor | None = None


class ExpertCounters:
    """Per (phase, layer, expert) token and activation counters on one device.

    ``routing_layers``/``routing_experts``/``top_k`` fix the shape of the per-pass staging
    buffer ``[routing_layers, capacity, top_k]`` (int32, ``-1`` = empty). ``capacity`` starts
    at ``max_tokens``; that *primary* buffer is never reallocated, so CUDA graphs captured
    against it stay valid. A pass with more tokens uses a separate *overflow* buffer (grown as
    needed); such passes must run eagerly.

    ``fold_impl`` picks how :meth:`fold` runs: ``"triton"`` (one kernel; the default on
    CUDA), ``"numpy"`` (the default on the CPU) or ``"torch"`` (torch ops; elsewhere).
    ``flush_layer`` (default: the last routing layer) is the layer whose record copies the
    pass's staged ids; :meth:`fold`, :meth:`staged` and :meth:`flush` copy any still pending.

    The totals can grow past the routing shape (host-path records of new layers/experts);
    :meth:`grow` reallocates them, never the staging buffers.
    """

    def __init__(
        self,
        routing_layers: int,
        routing_experts: int,
        top_k: int,
        max_tokens: int,
        device: torch.device | str = "cpu",
        fold_impl: str | None = None,
        *,
        window: int = 0,
        coactivation: bool = False,
    ) -> None:
        for name, value in (
            ("num_layers", routing_layers),
            ("num_experts", routing_experts),
            ("top_k", top_k),
            ("max_tokens", max_tokens),
            ("window", window),
        ):
            if value < 0:
                raise EnhancedError(f"{name} must be >= 0, got {value}", culprit=name)
        self.device = torch.device(device)
        default = {"cuda": "triton", "cpu": "numpy"}.get(self.device.type, "torch")
        self.fold_impl = default if fold_impl is None else fold_impl
        if self.fold_impl not in FOLD_IMPLS or (self.fold_impl == "numpy" and self.device.type != "cpu"):
            raise EnhancedError(
                f"fold_impl must be one of {list(FOLD_IMPLS)} (numpy on the CPU only), got {fold_impl!r} "
                f"on {self.device}",
                culprit="fold_impl",
            )
        self.routing_layers = routing_layers
        self.routing_experts = routing_experts
        self.top_k = top_k
        self.routing_enabled = routing_layers > 0 and routing_experts > 0 and top_k > 0
        self._primary = self._new_staging(max_tokens)
        self._overflow: torch.Tensor | None = None
        self._active = self._primary
        self._primary_rows = list(self._primary.unbind(0))
        self._overflow_rows: list[torch.Tensor] = []
        self._layer_rows = self._primary_rows
        self.flush_layer = routing_layers - 1
        self._pending_dst: list[torch.Tensor] = []
        self._pending_src: list[torch.Tensor] = []
        self._hist = torch.zeros(
            routing_layers * (routing_experts + 1), dtype=torch.int64, device=self.device
        )
        self._one = torch.ones(1, dtype=torch.int64, device=self.device)
        self._offsets = (
            torch.arange(routing_layers, dtype=torch.int64, device=self.device) * (routing_experts + 1)
        ).view(-1, 1)
        self._hist_counts = self._hist.view(routing_layers, routing_experts + 1)[:, :routing_experts]
        self.num_layers = 0
        self.num_experts = 0
        self._alloc_totals(routing_layers, routing_experts)
        shape = (routing_layers, routing_experts)
        self.ring = torch.zeros(window, *shape, dtype=torch.int32, device=self.device) if window else None
        self.coactivation = (
            torch.zeros(routing_layers, routing_experts, routing_experts, dtype=torch.int64, device=self.device)
            if coactivation else None
        )
        self.request_counts: torch.Tensor | None = None
        # Folds captured into CUDA graphs (see folding_in_graphs).
        self.pass_params = torch.zeros(PASS_PARAMS, dtype=torch.int64, device=self.device)
        self._params_host: _PinnedRing | None = None
        self._encode_params: Callable[..., list[int]] | None = None  # fold_kernel.encode_pass_params, once captured
        self._graph_token_rows: torch.Tensor | None = None
        self._capturing_folds = False
        self.graph_folds = False
        self._eager_records = False

    def enable_request_slots(self, num_slots: int) -> torch.Tensor:
        """Allocate (once) the per-request-slot counts ``[num_slots, layers, experts]``; returns them."""
        if self.request_counts is None or self.request_counts.shape[0] < num_slots:
            self._check_not_captured("per-request-slot counts")
            self.request_counts = torch.zeros(
                num_slots, self.routing_layers, self.routing_experts, dtype=torch.int32, device=self.device
            )
        return self.request_counts

    def warm_up(self) -> None:
        """Compile the fold kernel's variants now (CUDA), not at the first pass of each kind."""
        if self.fold_impl == "triton" and self.routing_enabled:
            from sglang.srt.enhanced.moe_tracker import fold_kernel

            fold_kernel.warm_up(self.routing_experts, self.top_k, self.device, ring=self.ring is not None,
                                coactivation=self.coactivation is not None)  # fmt: skip

    # ------------------------------------------------------------------ staging
    @property
    def capacity(self) -> int:
        """Rows (tokens) of the primary staging buffer."""
        return self._primary.shape[1]

    def select(self, num_tokens: int) -> None:
        """Pick the staging buffer for a pass of ``num_tokens`` rows (host side, outside graphs)."""
        self._drop_pending()
        self._eager_records = False
        if num_tokens <= self.capacity:
            self._use_primary()
            return
        if self._overflow is None or self._overflow.shape[1] < num_tokens:
            self._overflow, self._overflow_rows = None, []
            self._overflow = self._new_staging(_round_up(num_tokens, 256))
            self._overflow_rows = list(self._overflow.unbind(0))
        self._active, self._layer_rows = self._overflow, self._overflow_rows

    def record(self, layer_id: int, topk_ids: torch.Tensor) -> None:
        """Stage one layer's ``[num_tokens, k]`` expert ids (``k <= top_k``).

        Capture-safe: keeps a reference to ``topk_ids`` and its destination rows in the buffer
        selected for this pass; the record of ``flush_layer`` copies all of them at once. Rows
        beyond the pass's tokens (graph padding) are written but ignored by :meth:`fold`.
        """
        try:
            rows = self._layer_rows[layer_id]
        except IndexError:
            raise EnhancedError(
                f"layer {layer_id} is outside the {self.routing_layers} routing layers",
                culprit=(layer_id, None),
            ) from None
        n, k = topk_ids.shape
        if n > rows.shape[0] or k > self.top_k:
            raise EnhancedError(
                f"topk_ids of shape {tuple(topk_ids.shape)} exceed the staging buffer "
                f"[{rows.shape[0]}, {self.top_k}]; raise max_tokens or begin the pass with more tokens",
                culprit=(layer_id, None),
            )
        if self._active is not self._primary and _is_capturing(self.device):
            raise EnhancedError(
                f"a CUDA graph is being captured with {n} tokens, more than max_tokens={self.capacity}",
                culprit=(layer_id, None),
            )
        self._pending_dst.append(rows[:n] if k == self.top_k else rows[:n, :k])
        self._pending_src.append(topk_ids)
        # Only SGLang's graph capture (folding_in_graphs) asks; a record outside it is an eager pass's.
        capturing = self._capturing_folds and _is_capturing(self.device)
        self._eager_records = self._eager_records or not capturing
        if layer_id == self.flush_layer:
            self.flush()
            if capturing:
                self._capture_fold(n)

    # ------------------------------------------------------------------ folds in CUDA graphs
    @contextmanager
    def folding_in_graphs(self, token_rows: torch.Tensor | None = None) -> Iterator[None]:
        """While open, a CUDA graph captured over a pass holds the pass's fold too (CUDA, Triton fold).

        The captured fold reads each replay's token count, phase, time and ring slot from
        ``pass_params``, which :meth:`write_pass_params` fills before the replay; a pass that a graph
        replays then needs no fold launch (:meth:`fold` skips it: none of its records ran eagerly).
        ``token_rows``: the graphs' own input of each row's request slot (int32 or int64, at least as
        many rows as any captured pass), read at each replay for the per-request counts; None leaves
        them out of graph passes. Once a graph holds a fold, the totals are never reallocated.
        """
        if self.device.type != "cuda" or self.fold_impl != "triton" or not self.routing_enabled:
            yield
            return
        if self._params_host is None:
            self._params_host = _PinnedRing(PASS_PARAMS)
        self._capturing_folds, self._graph_token_rows = True, token_rows
        try:
            yield
        finally:
            self._capturing_folds, self._graph_token_rows = False, None

    def write_pass_params(self, num_tokens: int, phase: int, now: float, ring_slot: int) -> None:
        """Give the folds captured in graphs this pass's values (host side, before the replay; no sync)."""
        if not self.graph_folds:
            return
        values = self._encode_params(num_tokens, phase, now, ring_slot, self._counts, self.routing_layers,
                                    self.routing_experts)  # fmt: skip
        self._params_host.copy_to(self.pass_params, values)

    def _capture_fold(self, rows: int) -> None:
        from sglang.srt.enhanced.moe_tracker.fold_kernel import encode_pass_params, fold_pass_from_params

        token_rows = self._graph_token_rows
        requests = self.request_counts is not None and token_rows is not None
        outputs = PassOutputs(ring=self.ring, request_counts=self.request_counts if requests else None,
                              token_rows=token_rows if requests else None, coactivation=self.coactivation)  # fmt: skip
        fold_pass_from_params(self._primary, rows, self._counts, self.last_activation_time, self.pass_params,
                              self.routing_experts, outputs)  # fmt: skip
        self._encode_params = encode_pass_params
        self.graph_folds = True

    def _check_not_captured(self, what: str) -> None:
        if self.graph_folds:
            raise EnhancedError(
                f"the {what} cannot be reallocated: CUDA graphs captured with the tracker's fold write to them",
                culprit="tracker",
            )

    def flush(self) -> None:
        """Copy every pending record into the staging buffer (one multi-tensor copy; capture-safe).

        On the CPU the copies are numpy assignments: unlike a torch op they keep the GIL, so a
        busy thread beside the forward (SGLang's scheduler loop) does not delay the pass.
        """
        if not self._pending_src:
            return
        if self.device.type == "cpu":
            for dst, src in zip(self._pending_dst, self._pending_src, strict=True):
                if src.device.type == "cpu":
                    dst.numpy()[...] = src.numpy()
                else:
                    dst.copy_(src)
        else:
            torch._foreach_copy_(self._pending_dst, self._pending_src, non_blocking=True)
        self._drop_pending()

    def _drop_pending(self) -> None:
        self._pending_dst, self._pending_src = [], []

    def fold(
        self,
        num_tokens: int,
        phase: int,
        now: float,
        clear_rows: int | None = None,
        *,
        ring_slot: int | None = None,
        token_rows: torch.Tensor | None = None,
    ) -> None:
        """Add the histogram of rows ``[:num_tokens]`` of the staged pass to the totals.

        ``clear_rows`` (default ``num_tokens``) rows are then reset to ``-1`` for the next pass.
        ``ring_slot`` (with a ring) is where the pass's histogram goes; ``token_rows`` (int64,
        one entry per token, ``-1`` = none) the request slot of each token. No host sync.
        """
        self.flush()
        buf = self._active
        if self.graph_folds and not self._eager_records and buf is self._primary:
            return  # a CUDA graph replayed this pass, and the fold it holds counted it
        outputs = PassOutputs(
            ring=self.ring if ring_slot is not None else None,
            ring_slot=ring_slot or 0,
            request_counts=self.request_counts if token_rows is not None else None,
            token_rows=token_rows,
            coactivation=self.coactivation,
        )
        if self.fold_impl == "triton":
            from sglang.srt.enhanced.moe_tracker.fold_kernel import fold_pass

            fold_pass(buf, num_tokens, max(num_tokens, clear_rows or 0), self._counts,
                      self.last_activation_time, phase, now, self.routing_experts, outputs)
            self._use_primary()
            return
        num_tokens = min(num_tokens, buf.shape[1])
        if self.fold_impl == "numpy":
            self._fold_numpy(buf.numpy(), num_tokens, phase, now, clear_rows, outputs)
            self._use_primary()
            return
        if num_tokens > 0:
            nl, ne = self.routing_layers, self.routing_experts
            # Ids outside [0, ne) (padding -1 included) go to the dump column ne.
            ids = buf[:, :num_tokens].to(torch.int64).reshape(nl, -1)
            ids.clamp_(EMPTY, ne).remainder_(ne + 1).add_(self._offsets)
            self._hist.zero_()
            self._hist.scatter_add_(0, ids.view(-1), self._one.expand(ids.numel()))
            hist = self._hist_counts
            hit = hist > 0
            tokens, activations = self._fold_targets[phase]
            tokens.add_(hist)
            activations.add_(hit)
            self._fold_last.masked_fill_(hit, now)
            _fold_extras_torch(buf[:, :num_tokens], hist, outputs, self.routing_experts)
        clear = min(max(num_tokens, clear_rows or 0), buf.shape[1])
        if clear > 0:
            buf[:, :clear].fill_(EMPTY)
        self._use_primary()

    def _fold_numpy(self, buf: np.ndarray, num_tokens: int, phase: int, now: float,
                    clear_rows: int | None, outputs: PassOutputs) -> None:
        """:meth:`fold` on the CPU: numpy views of the staging buffer and the totals."""
        if num_tokens > 0:
            nl, ne = self.routing_layers, self.routing_experts
            ids = buf[:, :num_tokens].reshape(nl, -1)
            valid = (ids >= 0) & (ids < ne)
            flat = (ids + self._np_offsets)[valid]
            hist = np.bincount(flat, minlength=nl * ne).reshape(nl, ne)
            hit = hist > 0
            tokens, activations = self._np_fold_targets[phase]
            tokens += hist
            activations += hit
            self._np_fold_last[hit] = now
            _fold_extras_numpy(buf[:, :num_tokens], hist, outputs, nl, ne)
        clear = min(max(num_tokens, clear_rows or 0), buf.shape[1])
        if clear > 0:
            buf[:, :clear] = EMPTY

    def discard(self, clear_rows: int) -> None:
        """Drop a staged pass without counting it."""
        self._drop_pending()
        buf = self._active
        clear = min(clear_rows, buf.shape[1])
        if clear > 0:
            buf[:, :clear].fill_(EMPTY)
        self._use_primary()

    def staged(self) -> torch.Tensor:
        """The staging buffer of the current pass, pending records copied (for inspection and tests)."""
        self.flush()
        return self._active

    # ------------------------------------------------------------------ totals
    def add(self, layer_id: int, expert_id: int, tokens: int, phase: int, now: float) -> None:
        """Host path: one activation of ``(layer_id, expert_id)`` with ``tokens`` tokens."""
        self.grow(layer_id + 1, expert_id + 1)
        self._counts[:, 0, phase, layer_id, expert_id] += tokens
        self._counts[:, 1, phase, layer_id, expert_id] += 1
        self.last_activation_time[layer_id, expert_id] = now

    def grow(self, num_layers: int, num_experts: int) -> None:
        """Enlarge the totals to at least ``[num_layers, num_experts]``, keeping their values."""
        if num_layers <= self.num_layers and num_experts <= self.num_experts:
            return
        self._check_not_captured("totals")
        old_counts, old_last = self._counts, self.last_activation_time
        self._alloc_totals(max(num_layers, self.num_layers), max(num_experts, self.num_experts))
        nl, ne = old_last.shape
        self._counts[..., :nl, :ne].copy_(old_counts)
        self.last_activation_time[:nl, :ne].copy_(old_last)

    def reset(self) -> None:
        """Zero the resettable totals (co-activation included); lifetime totals are kept."""
        self._counts[0].zero_()
        self.last_activation_time.zero_()
        if self.coactivation is not None:
            self.coactivation.zero_()

    def to_cpu(self) -> dict[str, torch.Tensor]:
        """CPU copies of all totals (this syncs with the device)."""
        counts = self._counts.cpu()
        return {
            "tokens": counts[0, 0].clone(),
            "activations": counts[0, 1].clone(),
            "lifetime_tokens": counts[1, 0].clone(),
            "lifetime_activations": counts[1, 1].clone(),
            "last_activation_time": self.last_activation_time.to("cpu", copy=True),
        }

    # ------------------------------------------------------------------ internals
    def _alloc_totals(self, num_layers: int, num_experts: int) -> None:
        # [current/lifetime, tokens/activations, phase, layer, expert]: one add per pass updates
        # the resettable and the lifetime totals together.
        self._counts = torch.zeros(
            2, 2, len(PHASES), num_layers, num_experts, dtype=torch.int64, device=self.device
        )
        self.tokens, self.activations = self._counts[0, 0], self._counts[0, 1]
        self.lifetime_tokens, self.lifetime_activations = self._counts[1, 0], self._counts[1, 1]
        self.last_activation_time = torch.zeros(
            num_layers, num_experts, dtype=torch.float64, device=self.device
        )
        self.num_layers, self.num_experts = num_layers, num_experts
        # Views that fold() updates: [current/lifetime, routing layers, routing experts] per phase.
        nl, ne = self.routing_layers, self.routing_experts
        self._fold_targets = [
            (self._counts[:, 0, p, :nl, :ne], self._counts[:, 1, p, :nl, :ne]) for p in range(2)
        ]
        self._fold_last = self.last_activation_time[:nl, :ne]
        if self.device.type == "cpu":
            self._np_fold_targets = [(t.numpy(), a.numpy()) for t, a in self._fold_targets]
            self._np_fold_last = self._fold_last.numpy()
            self._np_offsets = np.arange(nl, dtype=np.int64).reshape(-1, 1) * ne

    def _use_primary(self) -> None:
        self._active, self._layer_rows = self._primary, self._primary_rows

    def _new_staging(self, rows: int) -> torch.Tensor:
        return torch.full(
            (self.routing_layers, rows, self.top_k), EMPTY, dtype=torch.int32, device=self.device
        )


def _pairs(top_k: int) -> tuple[np.ndarray, np.ndarray]:
    first, second = np.triu_indices(top_k, 1)
    return first, second


def _fold_extras_numpy(ids: np.ndarray, hist: np.ndarray, out: PassOutputs, layers: int,
                       num_experts: int) -> None:
    """Ring slot, per-request and co-activation counts of ``ids`` ``[layers, tokens, k]`` (numpy)."""
    _, tokens, top_k = ids.shape
    valid = (ids >= 0) & (ids < num_experts)
    layer_of = np.broadcast_to(np.arange(layers).reshape(-1, 1, 1), ids.shape)
    if out.ring is not None:
        out.ring.numpy()[out.ring_slot] = hist
    if out.request_counts is not None:
        rows = np.broadcast_to(out.token_rows.numpy()[:tokens].reshape(1, -1, 1), ids.shape)
        keep = valid & (rows >= 0)
        np.add.at(out.request_counts.numpy(), (rows[keep], layer_of[keep], ids[keep]), 1)
    if out.coactivation is not None and top_k > 1:
        first, second = _pairs(top_k)
        a, b = ids[:, :, first], ids[:, :, second]
        keep = valid[:, :, first] & valid[:, :, second] & (a != b)
        layer_p = np.broadcast_to(np.arange(layers).reshape(-1, 1, 1), a.shape)
        np.add.at(out.coactivation.numpy(),
                  (layer_p[keep], np.minimum(a, b)[keep], np.maximum(a, b)[keep]), 1)


def _fold_extras_torch(ids: torch.Tensor, hist: torch.Tensor, out: PassOutputs, num_experts: int) -> None:
    """:func:`_fold_extras_numpy` with torch ops and no host sync (invalid entries add 0).

    ``hist`` is the pass's ``[layers, experts]`` histogram.
    """
    layers, tokens, top_k = ids.shape
    ids = ids.to(torch.int64)
    valid = (ids >= 0) & (ids < num_experts)
    safe = ids.clamp(0, num_experts - 1)
    layer_of = torch.arange(layers, device=ids.device).view(-1, 1, 1).expand_as(ids)
    if out.ring is not None:
        out.ring[out.ring_slot].copy_(hist)
    if out.request_counts is not None:
        rows = out.token_rows[:tokens].view(1, -1, 1).expand_as(ids)
        keep = valid & (rows >= 0)
        out.request_counts.index_put_((rows.clamp(min=0), layer_of, safe), keep.to(torch.int32), accumulate=True)
    if out.coactivation is not None and top_k > 1:
        first, second = (torch.as_tensor(x, device=ids.device) for x in _pairs(top_k))
        a, b = safe[:, :, first], safe[:, :, second]
        keep = valid[:, :, first] & valid[:, :, second] & (a != b)
        layer_p = torch.arange(layers, device=ids.device).view(-1, 1, 1).expand_as(a)
        out.coactivation.index_put_((layer_p, torch.minimum(a, b), torch.maximum(a, b)), keep.to(torch.int64),
                                    accumulate=True)


def _round_up(value: int, multiple: int) -> int:
    return (value + multiple - 1) // multiple * multiple


class _PinnedRing:
    """Host-to-device copies of small int64 vectors with no sync per copy: rows of a pinned ring.

    A row is rewritten only after the copy that last read it has run: an event recorded as the
    copies leave each half of the ring is waited for when they come back to it (normally long done).
    """

    def __init__(self, width: int, rows: int = 64) -> None:
        self.host = torch.zeros(rows, width, dtype=torch.int64, pin_memory=True)
        self._view = self.host.numpy()
        self._rows = list(self.host.unbind(0))
        self._half = rows // 2
        self._events: list[torch.cuda.Event | None] = [None, None]
        self._next = 0

    def copy_to(self, dst: torch.Tensor, values: list[int]) -> None:
        """Enqueue ``dst.copy_(values)`` on the current stream."""
        i = self._next
        half = i // self._half
        if i % self._half == 0 and self._events[half] is not None:
            self._events[half].synchronize()
        self._view[i] = values
        dst.copy_(self._rows[i], non_blocking=True)
        self._next = (i + 1) % (2 * self._half)
        if self._next % self._half == 0:
            event = torch.cuda.Event()
            event.record()
            self._events[half] = event


def _is_capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()
