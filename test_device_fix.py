#!/usr/bin/env python3
"""The device helpers of fix_device_issues (the CUDA cases run where a GPU is visible)."""

from test_enhanced_features import run_tests

if __name__ == "__main__":
    run_tests(["test/unit/test_device_fix.py", "test/gpu/test_device_fix_gpu.py"])
