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
* SGLang's expert-distribution requests reach every scheduler: ``dump_record``
  writes this process's snapshot to the state folder (the HTTP server reads it),
  ``start_record`` resets the statistics.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sglang.srt.enhanced.moe_tracker.tracker import ExpertActivationTracker, set_global_expert_tracker
from sglang.srt.enhanced.settings import LaunchSettings
from sglang.srt.managers.expert_distribution import (
    ExpertDistributionRecorder,
    get_global_expert_distribution_recorder,
    set_global_expert_distribution_recorder,
)

logger = logging.getLogger(__name__)

_LAYER_IN_NAME = re.compile(r"(?:^|\.)layers\.(\d+)\.")
SNAPSHOT_PREFIX = "snapshot-"
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
        self.state_dir = state_dir
        self.current_layer: int | None = None
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
        tracker.begin_pass(num_tokens, is_decode=forward_batch.forward_mode.is_decode())
        try:
            with self.inner.with_forward_pass(forward_pass_id, forward_batch):
                yield
        except BaseException:
            tracker.abort_pass()
            raise
        with self._lock:
            tracker.end_pass(num_tokens)
            if tracker.device.type == "cuda":
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
        """Write this process's snapshot to the state folder (and dump SGLang's own record)."""
        if self.tracker is not None and self.state_dir is not None:
            write_snapshot(self.state_dir, self.snapshot().to_dict())
        if _overrides("dump_record", self.inner):
            return self.inner.dump_record(output_mode)
        return None

    @property
    def recording(self) -> bool:
        return self.inner.recording

    def snapshot(self):  # noqa: ANN201
        """The tracker's counters, ordered after every fold issued so far."""
        assert self.tracker is not None
        with self._lock:
            stream = self._fold_stream
            with torch.cuda.stream(stream) if stream is not None else nullcontext():
                return self.tracker.snapshot()

    # -- layer discovery -------------------------------------------------------------------
    def attach(self, model: nn.Module) -> list[torch.utils.hooks.RemovableHandle]:
        """Pre-hooks that name the current layer before each MoE module runs."""
        handles = []
        for layer_id, module in moe_layer_modules(model).items():
            def set_layer(_module: nn.Module, _args: Any, layer_id: int = layer_id) -> None:
                self.current_layer = layer_id

            handles.append(module.register_forward_pre_hook(set_layer))
        return handles


def write_snapshot(state_dir: Path, data: dict[str, Any]) -> Path:
    """Atomically write one process's snapshot as JSON; returns its path."""
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / f"{SNAPSHOT_PREFIX}{os.getpid()}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)
    return path


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
        )
        set_global_expert_tracker(tracker)
        logger.info("Expert tracking on %d MoE layers x %d experts (top-%d)",
                    len(layers), tracker.num_experts, first.top_k)
    recorder = TrackingRecorder(get_global_expert_distribution_recorder(), tracker, settings.state_dir)
    recorder.attach(model)
    set_global_expert_distribution_recorder(recorder)
    return recorder
