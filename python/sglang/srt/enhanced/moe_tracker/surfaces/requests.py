"""Record each finished request (id, prompt and completion tokens) in the server process."""

from __future__ import annotations

import logging
from typing import Any

from sglang.srt.enhanced.moe_tracker.tracker import ExpertActivationTracker

logger = logging.getLogger(__name__)


def record_finished_requests(tokenizer_manager: Any, tracker: ExpertActivationTracker) -> None:
    """Wrap ``tokenizer_manager._handle_batch_output`` to call ``tracker.record_request``.

    SGLang 0.4.7 has no hook for finished requests; the batch outputs that reach the
    tokenizer manager carry ``finished_reasons``, ``prompt_tokens`` and
    ``completion_tokens`` per request id, which is all that is read here.
    """
    handle = tokenizer_manager._handle_batch_output  # noqa: SLF001
    if getattr(handle, "__sglang_enhanced__", False):
        return

    def handle_and_record(recv_obj: Any) -> None:
        handle(recv_obj)
        finished = getattr(recv_obj, "finished_reasons", None)
        completion = getattr(recv_obj, "completion_tokens", None)
        if not finished or completion is None:
            return
        for i, rid in enumerate(recv_obj.rids):
            if finished[i] is not None:
                tracker.record_request(str(rid), int(recv_obj.prompt_tokens[i]), int(completion[i]))

    handle_and_record.__sglang_enhanced__ = True  # type: ignore[attr-defined]
    tokenizer_manager._handle_batch_output = handle_and_record  # noqa: SLF001
    logger.debug("recording finished requests for expert statistics")
