"""Record each finished request (id, prompt and completion tokens) in the server process."""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from typing import Any

logger = logging.getLogger(__name__)


class RequestLog:
    """The last ``max_requests`` finished requests' ids, prompt and completion tokens and finish time."""

    def __init__(self, max_requests: int = 10_000) -> None:
        self.max_requests = max_requests
        self._records: OrderedDict[str, dict[str, Any]] = OrderedDict()

    def record_request(self, request_id: str, input_length: int, output_length: int) -> None:
        self._records.pop(request_id, None)
        self._records[request_id] = {"request_id": request_id, "input_length": input_length,
                                     "output_length": output_length, "time": time.time(),
                                     "expert_activations": 0, "tokens_routed": 0}
        while len(self._records) > self.max_requests:
            self._records.popitem(last=False)

    def records(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self._records.values()]

    def clear(self) -> None:
        self._records.clear()


class RecordingDispatcher:
    """Passes every scheduler result to SGLang's dispatcher, then records finished requests.

    Batch outputs that reach the tokenizer manager carry ``rids``,
    ``finished_reasons``, ``prompt_tokens`` and ``completion_tokens``; that is all
    that is read here.
    """

    def __init__(self, inner: Any, log: RequestLog) -> None:
        self.inner = inner
        self.log = log

    def __call__(self, recv_obj: Any) -> Any:
        result = self.inner(recv_obj)
        finished = getattr(recv_obj, "finished_reasons", None)
        completion = getattr(recv_obj, "completion_tokens", None)
        if finished and completion is not None:
            for i, rid in enumerate(recv_obj.rids):
                if finished[i] is not None:
                    self.log.record_request(str(rid), int(recv_obj.prompt_tokens[i]), int(completion[i]))
        return result


def record_finished_requests(tokenizer_manager: Any, log: RequestLog) -> None:
    """Put a :class:`RecordingDispatcher` in front of the tokenizer manager's result dispatcher.

    SGLang 0.4.7 has no hook for finished requests; its tokenizer manager hands every
    scheduler result to ``_result_dispatcher``, which is wrapped here once.
    """
    dispatcher = tokenizer_manager._result_dispatcher  # noqa: SLF001
    if not isinstance(dispatcher, RecordingDispatcher):
        tokenizer_manager._result_dispatcher = RecordingDispatcher(dispatcher, log)  # noqa: SLF001
        logger.debug("recording finished requests for expert statistics")
