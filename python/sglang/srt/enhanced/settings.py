"""What the launcher hands to SGLang's scheduler processes, through the environment.

Scheduler processes are spawned and SGLang's ``LoadConfig`` carries no extra data
for a loader class, so the launcher writes these ``SGLANG_ENHANCED_*`` variables
before the server starts and the loader reads them back in each process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

_CONFIG = "SGLANG_ENHANCED_CONFIG"
_TRACKING = "SGLANG_ENHANCED_EXPERT_TRACKING"
_STATE_DIR = "SGLANG_ENHANCED_STATE_DIR"
_PROGRESS = "SGLANG_ENHANCED_PROGRESS"
_WINDOW = "SGLANG_ENHANCED_EXPERT_WINDOW_PASSES"
_REQUESTS = "SGLANG_ENHANCED_EXPERT_REQUEST_RECORDS"
_COACTIVATION = "SGLANG_ENHANCED_EXPERT_COACTIVATION"


@dataclass(frozen=True)
class LaunchSettings:
    """Settings of one enhanced server, shared by all of its processes."""

    config_path: Path | None = None
    expert_tracking: bool = False
    state_dir: Path | None = None
    progress: bool = True
    expert_window_passes: int = 1000
    expert_request_records: int = 1000
    expert_coactivation: bool = True

    @classmethod
    def from_env(cls) -> LaunchSettings:
        config = os.environ.get(_CONFIG)
        state = os.environ.get(_STATE_DIR)
        return cls(
            config_path=Path(config) if config else None,
            expert_tracking=os.environ.get(_TRACKING, "0") == "1",
            state_dir=Path(state) if state else None,
            progress=os.environ.get(_PROGRESS, "1") == "1",
            expert_window_passes=int(os.environ.get(_WINDOW, "1000")),
            expert_request_records=int(os.environ.get(_REQUESTS, "1000")),
            expert_coactivation=os.environ.get(_COACTIVATION, "1") == "1",
        )

    def to_env(self) -> None:
        """Publish these settings to this process and every process it starts."""
        _set(_CONFIG, str(self.config_path) if self.config_path else None)
        _set(_TRACKING, "1" if self.expert_tracking else "0")
        _set(_STATE_DIR, str(self.state_dir) if self.state_dir else None)
        _set(_PROGRESS, "1" if self.progress else "0")
        _set(_WINDOW, str(self.expert_window_passes))
        _set(_REQUESTS, str(self.expert_request_records))
        _set(_COACTIVATION, "1" if self.expert_coactivation else "0")


def _set(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
