"""The exchange of expert statistics between SGLang's scheduler processes and the HTTP server.

Counters live in the scheduler processes; the routes live in the HTTP server process. They
meet in one state folder (created by the launcher, removed when the server stops):

1. the server writes the query (:class:`StatsQuery`) with a fresh id to ``query.json``;
2. it sends SGLang's own "dump expert distribution record" request, which reaches every
   scheduler; each tracking scheduler reads the query, builds its snapshot and writes it,
   tagged with the query id, to ``snapshot-<pid>.json``;
3. the server reads back the snapshots tagged with its id (older answers are ignored).

Queries are serialised by the server (one at a time), so one query file suffices.
:func:`create_state_folder` also starts a small watcher in its own session that removes the
folder once the launcher has ended, so it goes even when the server's process group is killed.
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from sglang.srt.enhanced.errors import EnhancedError
from sglang.srt.enhanced.moe_tracker.snapshot import TrackerSnapshot

QUERY_FILE = "query.json"
ANSWER_PREFIX = "snapshot-"
STATE_PREFIX = "sglang-enhanced-"
# Waits for a process to end, then removes a folder (argv: pid, folder); imports nothing heavy.
# It forks once and the first process exits, so the watcher is nobody's child: SGLang's shutdown
# kills the launcher's whole process tree.
_WATCHER = """
import os, shutil, sys, time
pid, folder = int(sys.argv[1]), sys.argv[2]
if os.fork():
    os._exit(0)
while True:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        break
    except PermissionError:
        pass
    time.sleep(0.5)
shutil.rmtree(folder, ignore_errors=True)
"""


@dataclasses.dataclass(frozen=True)
class StatsQuery:
    """What a read asks of each scheduler.

    ``window``: counts of the last ``window`` passes instead of those since the reset;
    ``request_ids``: requests whose per-(layer, expert) tokens to include (None = all
    finished requests, empty = none); ``coactivation_layers``: layers whose pair counts to include.
    """

    window: int | None = None
    request_ids: tuple[str, ...] | None = ()
    coactivation_layers: tuple[int, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "window": self.window,
            "request_ids": None if self.request_ids is None else list(self.request_ids),
            "coactivation_layers": list(self.coactivation_layers),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StatsQuery:
        ids = data.get("request_ids", [])
        return cls(
            window=None if data.get("window") is None else int(data["window"]),
            request_ids=None if ids is None else tuple(str(r) for r in ids),
            coactivation_layers=tuple(int(x) for x in data.get("coactivation_layers", [])),
        )


class StatsExchange:
    """Both ends of the exchange over ``state_dir``."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = Path(state_dir)

    # -- HTTP server side ---------------------------------------------------------------
    def post_query(self, query: StatsQuery) -> int:
        """Publish ``query`` under a fresh id (returned) for the schedulers to answer."""
        query_id = time.time_ns()
        _write_json(self.state_dir / QUERY_FILE, {"id": query_id, "query": query.to_dict()})
        return query_id

    def answers(self, query_id: int) -> list[TrackerSnapshot]:
        """The snapshots written in answer to ``query_id``."""
        found = []
        for path in sorted(self.state_dir.glob(f"{ANSWER_PREFIX}*.json")):
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if data.get("query_id") == query_id:
                found.append(TrackerSnapshot.from_dict(data["snapshot"]))
        return found

    # -- scheduler side -----------------------------------------------------------------
    def current_query(self) -> tuple[int | None, StatsQuery]:
        """The pending query and its id (id None and the default query when there is none)."""
        try:
            data = json.loads((self.state_dir / QUERY_FILE).read_text())
        except (OSError, ValueError):
            return None, StatsQuery()
        return data.get("id"), StatsQuery.from_dict(data.get("query", {}))

    def write_answer(self, query_id: int | None, snapshot: TrackerSnapshot) -> Path:
        """This process's answer to ``query_id``."""
        path = self.state_dir / f"{ANSWER_PREFIX}{os.getpid()}.json"
        _write_json(path, {"query_id": query_id, "snapshot": snapshot.to_dict()})
        return path


def create_state_folder() -> Path:
    """A fresh state folder under the temp dir, removed when this process ends (however it ends)."""
    path = Path(tempfile.mkdtemp(prefix=STATE_PREFIX))
    atexit.register(shutil.rmtree, path, True)
    subprocess.run(
        [sys.executable, "-S", "-c", _WATCHER, str(os.getpid()), str(path)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True, close_fds=True, check=True, timeout=60,
    )
    return path


def _write_json(path: Path, data: dict[str, Any]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, path)
    except OSError as e:
        raise EnhancedError(f"cannot write expert statistics state: {e}", culprit=str(path)) from e
