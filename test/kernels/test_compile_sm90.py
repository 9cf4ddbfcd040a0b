"""Every product Triton kernel compiles for a Hopper GPU (sm_90) with the installed Triton.

The other kernel tests run the kernels under the Triton interpreter on CPU machines, which never
runs Triton's compiler: a kernel the interpreter accepts but the compiler rejects would pass them.
Here the real launchers compile each kernel ahead of time (``aot_compile.py``, in a process of its
own: conftest.py sets TRITON_INTERPRET=1 for this one) with the argument types and constexprs they
pass on a GPU, for each weight format, path and tuned tile size; nothing is launched.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("aot_compile.py")


def _no_cuda_backend() -> str | None:
    try:
        from triton.backends import backends
    except ImportError:
        return "Triton is not installed"
    if "nvidia" not in backends:
        return "the installed Triton has no CUDA backend"
    return None


def test_every_kernel_compiles_for_sm90() -> None:
    reason = _no_cuda_backend()
    if reason:
        pytest.skip(reason)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=1200)
    report = done.stdout + done.stderr[-4000:]
    if done.stdout.startswith("SKIP:"):
        pytest.skip(done.stdout.strip())
    failures = [line for line in done.stdout.splitlines() if line.startswith(("FAILED", "    "))]
    assert done.returncode == 0, "kernels that do not compile:\n" + ("\n".join(failures) or report)
    summary = done.stdout.strip().splitlines()[-1]
    assert " 0 failed, 0 never launched" in summary, report
