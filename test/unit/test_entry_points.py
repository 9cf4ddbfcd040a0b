"""The seed's test commands (``python3 test_enhanced_features.py`` and friends) run the suite's real tests.

Each goes through ``start_enhanced_server.sh --test`` in the environment this run uses.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
VENV = Path(sys.prefix)

pytestmark = pytest.mark.skipif(
    not (list(VENV.glob(".sglang-enhanced-deps-*")) and list(VENV.glob(".sglang-enhanced-src-*"))),
    reason="this environment was not set up by start_enhanced_server.sh (it would install into it)",
)


def entry_point(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / script), *args],
        env={**os.environ, "SGLANG_ENHANCED_VENV": str(VENV)},
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )


@pytest.mark.parametrize(
    "script,expected,left_out",
    [
        ("test_enhanced_features.py",
         ["test/unit/test_decoders.py::", "test/kernels/test_gptq_dequant.py::", "test/e2e/test_serve_demo.py::"], []),
        ("test_gptq_fix.py",
         ["test/unit/test_decoders.py::test_gptq_decode_matches_float64", "test/kernels/test_gptq_dequant.py::",
          "test/unit/test_decoders.py::test_seed_reproducer_shapes_and_dimension_log"],
         ["test_fp8_", "test/e2e/"]),
        ("test_device_fix.py", ["test/unit/test_device_fix.py::", "test/gpu/test_device_fix_gpu.py::"],
         ["test/unit/test_decoders.py"]),
    ],
)  # fmt: skip
def test_selection(script, expected, left_out):
    result = entry_point(script, "--collect-only")  # the start script passes -q: one node id a line
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    for node in expected:
        assert node in result.stdout, node
    for node in left_out:
        assert node not in result.stdout, node


def test_simple_gptq_test_runs_the_seed_checks():
    result = entry_point("simple_gptq_test.py", "-rA")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    for name in ("test_seed_reproducer_shapes_and_dimension_log", "test_seed_dequantizer_matches_float64",
                 "test_seed_detection_by_tensor_names", "test_seed_detection_idiom_on_the_demo_gptq_release",
                 "test_seed_detection_readme_example_runs_as_written"):
        assert f"PASSED test/unit/test_decoders.py::{name}" in result.stdout, name
    assert "5 passed" in result.stdout
