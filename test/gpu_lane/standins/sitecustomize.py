"""Interpreter start-up hook of the GPU test lane (this folder is put on PYTHONPATH there).

Installs the sgl-kernel / vllm stand-in finder in every process, including the server's
spawned scheduler and detokenizer processes.
"""

import gpu_lane_kernels

gpu_lane_kernels.install()
