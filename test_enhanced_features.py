#!/usr/bin/env python3
"""The whole test suite: ``python3 test_enhanced_features.py [PYTEST_ARGS...]``.

The same as ``./start_enhanced_server.sh --test``: sets up what is missing, runs ruff, then
pytest. The other entry points here run a part of it through :func:`run_tests`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent


def run_tests(selection: Sequence[str] = ()) -> None:
    """Replace this process with the start script's test run over ``selection`` and ``sys.argv[1:]``."""
    script = str(ROOT / "start_enhanced_server.sh")
    os.execv(script, [script, "--test", *selection, *sys.argv[1:]])


if __name__ == "__main__":
    run_tests()
