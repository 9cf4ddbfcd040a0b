"""Kernel tests run natively on a GPU and under the Triton interpreter on CPU-only machines.

TRITON_INTERPRET must be set before any Triton kernel is defined, so it is set here, at
collection time, before the test modules import the kernels.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
