"""Interpreter start-up hook of the GPU test lane (this folder is put on PYTHONPATH there).

Installs, in every process (the server's spawned scheduler and detokenizer too), the
sgl-kernel / vllm stand-in finder and the after-import fixes of gpu_lane_kernels.compat.
"""

import gpu_lane_kernels
from gpu_lane_kernels import compat

gpu_lane_kernels.install()
compat.install()
