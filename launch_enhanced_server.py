#!/usr/bin/env python3
"""Start SGLang's OpenAI-compatible server with mixed-precision loading and expert tracking.

    python3 launch_enhanced_server.py --config mixed_precision_config.yaml --model /path/to/model \
        --port 8080 --enable-expert-tracking

Run with ``--help`` for every option (SGLang's own server options are accepted too).
"""

import sys

from sglang.srt.enhanced.launch import main

if __name__ == "__main__":
    sys.exit(main())
