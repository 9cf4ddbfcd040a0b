"""The GPU lane's stand-in package is importable by its tests (on the lane it sits on PYTHONPATH)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

STANDINS = Path(__file__).resolve().parent / "standins"
if str(STANDINS) not in sys.path:
    sys.path.insert(0, str(STANDINS))


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
