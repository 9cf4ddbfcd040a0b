"""Interpreter start-up hook of the GPU test lane (this folder is put on PYTHONPATH there).

Installs, in every process (the server's spawned scheduler and detokenizer too), the
sgl-kernel / vllm stand-in finder and the Triton 3.4+ names SGLang 0.4.7 imports.
"""

import gpu_lane_kernels
from gpu_lane_kernels import triton_compat

gpu_lane_kernels.install()
triton_compat.install()
