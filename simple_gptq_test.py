#!/usr/bin/env python3
"""The seed's GPTQ checks: the [256,768]/[16,96]/[16,768] reproducer, float64 agreement, is_gptq_weight."""

from test_enhanced_features import run_tests

if __name__ == "__main__":
    run_tests(["test/unit/test_decoders.py", "-k", "seed"])
