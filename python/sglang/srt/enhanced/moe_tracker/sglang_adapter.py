"""Expert tracking inside SGLang's scheduler processes.

SGLang 0.4.7 calls the global expert-distribution recorder from ``select_experts``
(``on_select_experts``) on every MoE layer and from ``ModelRunner.forward``
(``with_forward_pass``). :class:`TrackingRecorder` wraps whatever recorder SGLang
installed (so its own ``--expert-distribution-recorder-mode`` keeps working) and
feeds an :class:`ExpertActivationTracker`:

* the layer of each ``select_experts`` call comes from a forward pre-hook on every
  ``FusedMoE`` module, from its place in the model (``...layers.<i>...``) — Mixtral
  and OLMoE never announce their layer to the recorder;
* one pass = one ``with_forward_pass``; only TP rank 0 counts, so a token counts once;
* per-request expert use: each pass gives the tracker every token's request slot
  (``forward_batch.req_pool_indices``, repeated over each request's extend tokens);
  :class:`RequestSlots` learns which request holds a slot when SGLang assigns it
  (``ScheduleBatch.prepare_for_extend``) and closes the slot's record when SGLang frees
  it (``ReqToTokenPool.free``: a request finished, or its next prompt chunk moves slot);
* CUDA graphs: :func:`fold_in_captured_graphs` makes SGLang's graph capture hold the
  tracker's fold, so a replayed decode step costs the host one small copy (the pass's
  values), not a fold launch; the fold reads each row's request slot from the graph
  runner's own input;
* SGLang's expert-distribution requests reach every scheduler: ``dump_record``
  answers the pending query of the statistics exchange (``exchange.py``),
  ``start_record`` resets the statistics.
"""

from __future__ import annotations

import logging
import re
import threading
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sglang.srt.enhanced.errors import EnhancedError
from sglang.srt.enhanced.moe_tracker.exchange import StatsExchange
from sglang.srt.enhanced.moe_tracker.snapshot import TrackerSnapshot
from sglang.srt.enhanced.moe_tracker.tracker import ExpertActivationTracker, set_global_expert_tracker
from sglang.srt.enhanced.settings import LaunchSettings
from sglang.srt.managers.expert_distribution import (
    ExpertDistributionRecorder,
    get_global_expert_distribution_recorder,
    set_global_expert_distribution_recorder,
)

logger = logging.getLogger(__name__)

_LAYER_IN_NAME = re.compile(r"(?:^|\.)layers\.(\d+)\.")
# Rows of the capture-safe staging buffer: above SGLang's largest CUDA-graph batch.
GRAPH_SAFE_TOKENS = 1024


def moe_layer_modules(model: nn.Module) -> dict[int, nn.Module]:
    """Every SGLang MoE experts module (``FusedMoE``, ``EPMoE``) of ``model`` by its decoder layer."""
    from sglang.srt.layers.moe.ep_moe.layer import EPMoE
    from sglang.srt.layers.moe.fused_moe_triton.layer import FusedMoE

    found: dict[int, nn.Module] = {}
    for name, module in model.named_modules():
        if isinstance(module, (FusedMoE, EPMoE)):
            match = _LAYER_IN_NAME.search(name)
            if match is not None:
                found[int(match.group(1))] = module
    return found


def _routed_experts(hf_config: Any, module: nn.Module) -> int:
    for attr in ("num_experts", "n_routed_experts", "num_local_experts"):
        value = getattr(hf_config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return int(module.num_experts)


def _overrides(method: str, recorder: ExpertDistributionRecorder) -> bool:
    return getattr(type(recorder), method) is not getattr(ExpertDistributionRecorder, method)


class TrackingRecorder(ExpertDistributionRecorder):
    """SGLang recorder that also feeds the tracker (``tracker`` is None on TP ranks > 0)."""

    def __init__(
        self, inner: ExpertDistributionRecorder, tracker: ExpertActivationTracker | None, state_dir: Path | None
    ) -> None:
        self.inner = inner
        self.tracker = tracker
        self.exchange = StatsExchange(state_dir) if state_dir is not None else None
        self.current_layer: int | None = None
        self.slots: RequestSlots | None = None
        self._lock = threading.Lock()
        self._fold_stream: torch.cuda.Stream | None = None

    # -- hooks SGLang calls on the forward path -------------------------------------------
    @contextmanager
    def with_current_layer(self, layer_idx: int):
        # Models that announce their layer (Qwen2/3-MoE, DeepSeek, whose DeepEP path routes
        # before its experts module runs) set it here; the pre-hooks cover the others.
        self.current_layer = layer_idx
        with self.inner.with_current_layer(layer_idx):
            yield

    def with_debug_name(self, debug_name):  # noqa: ANN001, ANN201
        return self.inner.with_debug_name(debug_name)

    @contextmanager
    def with_forward_pass(self, forward_pass_id: int, forward_batch: Any):
        tracker = self.tracker
        self.current_layer = None
        num_tokens = int(forward_batch.input_ids.shape[0]) if tracker is not None else 0
        if tracker is None or num_tokens == 0:
            with self.inner.with_forward_pass(forward_pass_id, forward_batch):
                yield
            return
        token_rows = self.slots.token_rows(forward_batch, num_tokens) if self.slots is not None else None
        tracker.begin_pass(num_tokens, is_decode=forward_batch.forward_mode.is_decode(), token_rows=token_rows)
        try:
            with self.inner.with_forward_pass(forward_pass_id, forward_batch):
                yield
        except BaseException:
            tracker.abort_pass()
            raise
        with self._lock:
            tracker.end_pass(num_tokens)
            if self._fold_stream is None and tracker.device.type == "cuda":
                # SGLang runs every forward pass of a process on one stream (its forward thread's).
                self._fold_stream = torch.cuda.current_stream(tracker.device)

    def on_select_experts(self, topk_ids: torch.Tensor) -> None:
        self.inner.on_select_experts(topk_ids)
        if self.tracker is not None and self.current_layer is not None:
            self.tracker.record_routing(self.current_layer, topk_ids)

    def on_deepep_dispatch_normal(self, *args: Any, **kwargs: Any) -> None:
        self.inner.on_deepep_dispatch_normal(*args, **kwargs)

    def on_deepep_dispatch_low_latency(self, *args: Any, **kwargs: Any) -> None:
        self.inner.on_deepep_dispatch_low_latency(*args, **kwargs)

    # -- control requests (reach every scheduler process) ---------------------------------
    def start_record(self) -> None:
        """Reset the tracker's statistics (and start SGLang's own record, if enabled)."""
        if self.tracker is not None:
            with self._lock:
                self.tracker.reset_stats()
        if _overrides("start_record", self.inner):
            self.inner.start_record()

    def stop_record(self) -> None:
        if _overrides("stop_record", self.inner):
            self.inner.stop_record()

    def dump_record(self, output_mode: str = "file"):  # noqa: ANN201 - SGLang's signature
        """Answer the exchange's pending query (and dump SGLang's own record)."""
        if self.tracker is not None and self.exchange is not None:
            query_id, query = self.exchange.current_query()
            try:
                snap = self.snapshot(window=query.window, request_ids=query.request_ids,
                                     coactivation_layers=query.coactivation_layers)
            except EnhancedError as e:  # the server reports that no scheduler answered
                logger.warning("expert statistics query not answered: %s", e)
            else:
                self.exchange.write_answer(query_id, snap)
        if _overrides("dump_record", self.inner):
            return self.inner.dump_record(output_mode)
        return None

    @property
    def recording(self) -> bool:
        return self.inner.recording

    def snapshot(self, **query: Any) -> TrackerSnapshot:
        """The tracker's counters, ordered after every fold issued so far (``query``: see ``tracker.snapshot``)."""
        assert self.tracker is not None
        with self._lock, self._on_fold_stream():
            return self.tracker.snapshot(**query)

    def release_slot(self, slot: int, request_id: str, finished: bool) -> None:
        """Close request slot ``slot`` (on the folds' stream, so after every fold issued so far)."""
        assert self.tracker is not None
        with self._lock, self._on_fold_stream():
            self.tracker.release_request_slot(slot, request_id, finished)

    def _on_fold_stream(self):  # noqa: ANN202
        stream = self._fold_stream
        return torch.cuda.stream(stream) if stream is not None else nullcontext()

    # -- layer discovery -------------------------------------------------------------------
    def attach(self, model: nn.Module) -> list[torch.utils.hooks.RemovableHandle]:
        """Pre-hooks that name the current layer before each MoE module runs."""
        handles = []
        for layer_id, module in moe_layer_modules(model).items():
            def set_layer(_module: nn.Module, _args: Any, layer_id: int = layer_id) -> None:
                self.current_layer = layer_id

            handles.append(module.register_forward_pre_hook(set_layer))
        return handles


class RequestSlots:
    """Which request holds each of SGLang's request slots, and each pass's token -> slot map.

    SGLang 0.4.7 has no hook for slot ownership: :meth:`install` wraps
    ``ScheduleBatch.prepare_for_extend`` (where requests get their slots) and
    ``ReqToTokenPool.free`` (where slots are given back) of this scheduler process. The
    first pass sizes the tracker's per-slot counts from the pass's request pool.
    """

    _installed: RequestSlots | None = None

    def __init__(self, recorder: TrackingRecorder, max_records: int) -> None:
        self.recorder = recorder
        self.max_records = max_records
        self.owners: dict[int, Any] = {}  # slot -> Req

    def install(self) -> None:
        from sglang.srt.managers.schedule_batch import ScheduleBatch
        from sglang.srt.mem_cache.memory_pool import ReqToTokenPool

        first = RequestSlots._installed is None
        RequestSlots._installed = self
        if not first:
            return
        prepare, free = ScheduleBatch.prepare_for_extend, ReqToTokenPool.free

        def prepare_for_extend(batch: Any) -> Any:
            result = prepare(batch)
            slots = RequestSlots._installed
            for req in batch.reqs:
                slots.owners[req.req_pool_idx] = req
            return result

        def free_slots(pool: Any, free_index: Any) -> Any:
            RequestSlots._installed.released(free_index)
            return free(pool, free_index)

        ScheduleBatch.prepare_for_extend = prepare_for_extend
        ReqToTokenPool.free = free_slots

    def released(self, free_index: int | list[int]) -> None:
        for slot in [free_index] if isinstance(free_index, int) else list(free_index):
            req = self.owners.pop(int(slot), None)
            if req is not None and self.recorder.tracker is not None:
                self.recorder.release_slot(int(slot), str(req.rid), req.finished())

    def enable(self, pool: Any) -> None:
        """Size the tracker's per-slot counts for SGLang's request pool ``pool`` (once)."""
        tracker = self.recorder.tracker
        if tracker is not None and tracker.request_use is None:
            tracker.enable_request_use(int(pool.size), self.max_records)

    def token_rows(self, forward_batch: Any, num_tokens: int) -> torch.Tensor | None:
        """Each token's request slot (int64, on the device), or None for passes without per-request use."""
        tracker = self.recorder.tracker
        pool = getattr(forward_batch, "req_to_token_pool", None)
        indices = getattr(forward_batch, "req_pool_indices", None)
        if tracker is None or pool is None or indices is None:
            return None
        self.enable(pool)
        mode = forward_batch.forward_mode
        if mode.is_decode():
            return indices if indices.numel() == num_tokens else None
        if mode.is_extend_or_draft_extend_or_mixed() and not mode.is_draft_extend():
            lens = forward_batch.extend_seq_lens
            if lens is None or forward_batch.extend_seq_lens_cpu is None \
                    or sum(forward_batch.extend_seq_lens_cpu) != num_tokens:
                return None
            return torch.repeat_interleave(indices, lens, output_size=num_tokens)
        return None


def fold_in_captured_graphs() -> None:
    """Wrap SGLang's ``CudaGraphRunner.capture`` (once per process) so the graphs it captures fold
    their own passes into the installed tracker (see ``ExpertActivationTracker.folding_in_graphs``).

    Per-request counts come from the runner's request-slot input (``req_pool_indices``); the
    tracker's per-slot counts are sized for the runner's request pool first. With several tokens
    per request in a graph (speculative decoding), graph passes leave per-request counts out.
    """
    from sglang.srt.model_executor.cuda_graph_runner import CudaGraphRunner

    capture = CudaGraphRunner.capture
    if getattr(capture, "folds_tracking", False):
        return

    def capture_with_folds(runner: Any) -> Any:
        recorder = get_global_expert_distribution_recorder()
        tracker = getattr(recorder, "tracker", None)
        if not isinstance(recorder, TrackingRecorder) or tracker is None:
            return capture(runner)
        token_rows = None
        if recorder.slots is not None and runner.num_tokens_per_bs == 1:
            recorder.slots.enable(runner.model_runner.req_to_token_pool)
            token_rows = runner.req_pool_indices
        with tracker.folding_in_graphs(token_rows):
            result = capture(runner)
        if tracker.graphs_fold:
            logger.info("Expert tracking: the CUDA graphs fold their own passes (per-request counts %s)",
                        "on" if token_rows is not None and tracker.request_use is not None else "off")
        return result

    capture_with_folds.folds_tracking = True
    CudaGraphRunner.capture = capture_with_folds


def install_tracking_recorder(model: nn.Module, model_config: Any, settings: LaunchSettings) -> TrackingRecorder:
    """Wrap SGLang's global recorder with a :class:`TrackingRecorder` for ``model``."""
    from sglang.srt.distributed import get_tensor_model_parallel_rank

    layers = moe_layer_modules(model)
    tracker = None
    if get_tensor_model_parallel_rank() == 0 and layers:
        first = next(iter(layers.values()))
        hf_config = model_config.hf_text_config
        device = next(model.parameters()).device
        tracker = ExpertActivationTracker(
            num_layers=int(hf_config.num_hidden_layers),
            num_experts=_routed_experts(hf_config, first),
            top_k=int(first.top_k),
            max_tokens=GRAPH_SAFE_TOKENS,
            device=device,
            layer_ids=sorted(layers),
            window_passes=settings.expert_window_passes,
            coactivation=settings.expert_coactivation,
        )
        tracker.warm_up()
        set_global_expert_tracker(tracker)
        logger.info("Expert tracking on %d MoE layers x %d experts (top-%d)",
                    len(layers), tracker.num_experts, first.top_k)
    recorder = TrackingRecorder(get_global_expert_distribution_recorder(), tracker, settings.state_dir)
    recorder.attach(model)
    if tracker is not None and settings.expert_request_records > 0:
        recorder.slots = RequestSlots(recorder, settings.expert_request_records)
        recorder.slots.install()
    if tracker is not None:
        fold_in_captured_graphs()
    set_global_expert_distribution_recorder(recorder)
    return recorder
