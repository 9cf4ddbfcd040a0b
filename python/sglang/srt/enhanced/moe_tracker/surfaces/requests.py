"""Record each finished request (id, prompt and completion tokens) in the server process."""

from __future__ import annotations

import logging
from typing import Any

from sglang.srt.enhanced.moe_tracker.tracker import ExpertActivationTracker

logger = logging.getLogger(__name__)


class RecordingDispatcher:
    """Passes every scheduler result to SGLang's dispatcher, then records finished requests.

    Batch outputs that reach the tokenizer manager carry ``rids``,
    ``finished_reasons``, ``prompt_tokens`` and ``completion_tokens``; that is all
    that is read here.
    """

    def __init__(self, inner: Any, tracker: ExpertActivationTracker) -> None:
        self.inner = inner
        self.tracker = tracker

    def __call__(self, recv_obj: Any) -> Any:
        result = self.inner(recv_obj)
        finished = getattr(recv_obj, "finished_reasons", None)
        completion = getattr(recv_obj, "completion_tokens", None)
        if finished and completion is not None:
            for i, rid in enumerate(recv_obj.rids):
                if finished[i] is not None:
                    self.tracker.record_request(str(rid), int(recv_obj.prompt_tokens[i]), int(completion[i]))
        return result


def record_finished_requests(tokenizer_manager: Any, tracker: ExpertActivationTracker) -> None:
    """Put a :class:`RecordingDispatcher` in front of the tokenizer manager's result dispatcher.

    SGLang 0.4.7 has no hook for finished requests; its tokenizer manager hands every
    scheduler result to ``_result_dispatcher``, which is wrapped here once.
    """
    dispatcher = tokenizer_manager._result_dispatcher  # noqa: SLF001
    if not isinstance(dispatcher, RecordingDispatcher):
        tokenizer_manager._result_dispatcher = RecordingDispatcher(dispatcher, tracker)  # noqa: SLF001
        logger.debug("recording finished requests for expert statistics")
