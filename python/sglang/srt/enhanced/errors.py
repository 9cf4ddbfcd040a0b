"""The one exception type sglang-enhanced raises for bad input."""

from __future__ import annotations

from typing import Any


class EnhancedError(ValueError):
    """Bad configuration, checkpoint or request.

    ``culprit`` names what is wrong: a tensor name, a YAML key path, a file, or a
    ``(layer, expert)`` pair. It is appended to the message so logs show it.
    """

    def __init__(self, msg: str, culprit: Any = None) -> None:
        self.msg = msg
        self.culprit = culprit
        super().__init__(f"{msg} [culprit: {culprit}]" if culprit is not None else msg)
