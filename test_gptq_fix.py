#!/usr/bin/env python3
"""The GPTQ decoding checks: decoders, detection, the seed's shapes, the Triton kernels (pytest args may follow)."""

from test_enhanced_features import run_tests

if __name__ == "__main__":
    run_tests(["test/unit/test_decoders.py", "-k", "gptq or seed", "test/kernels/test_gptq_dequant.py"])
